"""MLA decode steps attend in the latent space: the same result as expanding every cached latent through
kv_b_proj, with rows of different lengths, with an adapter on kv_b_proj, and after the weights change."""

from __future__ import annotations

import torch
from model_helpers import assert_close_to_scale, micro_config, perturb_

from kimitune.adapters import LoraSettings, apply_lora
from kimitune.model.mla import MLAState, MultiheadLatentAttention


def layer_and_cache(batch: int, cached: int, seed: int = 0):
    torch.manual_seed(seed)
    layer = perturb_(MultiheadLatentAttention(micro_config()), seed)
    config = micro_config()
    latent = torch.randn(batch, cached, config.kv_lora_rank)
    k_shared = torch.randn(batch, cached, config.qk_rope_head_dim)
    x = torch.randn(batch, 1, config.hidden_size)
    return layer, x, MLAState(latent, k_shared)


def both_ways(layer, x, state):
    with torch.no_grad():
        absorbed, absorbed_state = layer(x, state=state, return_state=True)
    with torch.enable_grad():  # autograd on: the expanded path, the model's training-time computation
        expanded, expanded_state = layer(x, state=state, return_state=True)
    assert torch.equal(absorbed_state.latent, expanded_state.latent)
    return absorbed, expanded.detach()


def test_a_decode_step_in_the_latent_space_equals_the_expanded_attention():
    layer, x, state = layer_and_cache(batch=3, cached=37)
    absorbed, expanded = both_ways(layer, x, state)
    assert_close_to_scale(absorbed, expanded, 1e-5, "decode step")


def test_rows_with_padding_attend_only_to_their_valid_entries():
    layer, x, state = layer_and_cache(batch=2, cached=20)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[0, 11:] = False  # row 0 holds 11 entries, row 1 all 20
    padded = MLAState(state.latent, state.k_shared, valid)
    absorbed, expanded = both_ways(layer, x, padded)
    assert_close_to_scale(absorbed, expanded, 1e-5, "padded rows")
    # Row 0 alone, without the padding, gives the same output.
    alone, _ = both_ways(layer, x[:1], MLAState(state.latent[:1, :11], state.k_shared[:1, :11]))
    assert_close_to_scale(absorbed[:1], alone, 1e-5, "row 0 alone")


def test_an_adapter_on_kv_b_proj_and_changed_weights_are_seen():
    layer, x, state = layer_and_cache(batch=2, cached=16)
    apply_lora(layer, LoraSettings(r=4, alpha=8, target_modules=["kv_b_proj"]))
    with torch.no_grad():
        layer.kv_b_proj.lora_B.normal_(0, 0.1)  # a trained adapter: B is no longer zero
    absorbed, expanded = both_ways(layer, x, state)
    assert_close_to_scale(absorbed, expanded, 1e-5, "with LoRA")
    with torch.no_grad():
        layer.kv_b_proj.lora_A.mul_(2.0)  # an in-place update, as an optimizer step makes
    changed, expanded_changed = both_ways(layer, x, state)
    assert_close_to_scale(changed, expanded_changed, 1e-5, "after the update")
    assert not torch.allclose(changed, absorbed)
