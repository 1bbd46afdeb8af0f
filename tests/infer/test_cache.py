"""The generation cache against one full forward pass: prefill (packed, grouped, single), decode steps, dropping
finished rows, continuing one sequence; and its memory: KDA flat in the context length, MLA linear."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import full_logits, random_prompts

from kimitune.infer import GenerationCache
from kimitune.model.kda import KDAState
from kimitune.model.mla import MLAState

ATOL = 2e-5  # float32 round-off between chunked and token-by-token KDA, and over padded MLA keys


def assert_matches_full_pass(model, sequences: list[list[int]], logits_by_position: dict) -> None:
    """logits_by_position[(sequence, position)] must equal the full pass's logits after token ``position``."""
    for index, sequence in enumerate(sequences):
        reference = full_logits(model, sequence)
        for (row, position), got in logits_by_position.items():
            if row == index:
                torch.testing.assert_close(got, reference[position], rtol=0, atol=ATOL,
                                           msg=f"sequence {index} after token {position}")


@pytest.mark.parametrize("prefill_tokens", [4096, 12], ids=["one-packed-group", "several-groups"])
def test_batched_prefill_and_decode_of_different_lengths_match_full_passes(tiny_model, prefill_tokens):
    prompts = random_prompts([5, 11, 1, 8], seed=1)
    continuations = random_prompts([4, 4, 4, 4], seed=2)
    cache = GenerationCache(tiny_model, prefill_tokens=prefill_tokens)
    got = {(i, len(p) - 1): row for i, (p, row) in enumerate(zip(prompts, cache.prefill(prompts)))}
    for step in range(4):
        logits = cache.step([c[step] for c in continuations])
        got.update({(i, len(p) + step): logits[i] for i, p in enumerate(prompts)})
    sequences = [p + c for p, c in zip(prompts, continuations)]
    assert cache.sequences == sequences
    assert_matches_full_pass(tiny_model, sequences, got)


def test_single_prompt_and_multi_token_continuation_match_a_full_pass(tiny_model):
    prompt, second_turn, steps = random_prompts([9, 6, 3], seed=3)
    cache = GenerationCache(tiny_model)
    got = {(0, 8): cache.prefill([prompt])[0]}
    got[(0, 14)] = cache.extend(second_turn)[0]
    for i, token in enumerate(steps):
        got[(0, 15 + i)] = cache.step([token])[0]
    assert_matches_full_pass(tiny_model, [prompt + second_turn + steps], got)


def test_a_prompt_and_a_turn_longer_than_prefill_tokens_go_in_pieces_and_match_a_full_pass(tiny_model):
    prompt, second_turn, steps = random_prompts([23, 10, 3], seed=4)
    cache = GenerationCache(tiny_model, prefill_tokens=7)  # the prompt in 4 pieces, the turn in 2
    calls = []
    hook = tiny_model.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    try:
        got = {(0, 22): cache.prefill([prompt])[0]}
        got[(0, 32)] = cache.extend(second_turn)[0]
    finally:
        hook.remove()
    assert calls == [7, 7, 7, 2, 7, 3]
    for i, token in enumerate(steps):
        got[(0, 33 + i)] = cache.step([token])[0]
    assert_matches_full_pass(tiny_model, [prompt + second_turn + steps], got)


def test_dropping_finished_sequences_keeps_the_others_exact(tiny_model):
    prompts = random_prompts([3, 12, 6], seed=4)
    tokens = random_prompts([3, 3, 3], seed=5)
    cache = GenerationCache(tiny_model)
    cache.prefill(prompts)
    cache.step([t[0] for t in tokens])
    cache.keep([2, 0])  # the longest prompt leaves: the MLA padding only it needed goes too
    mla = [s for s in cache.layer_states.values() if isinstance(s, MLAState)][0]
    assert mla.latent.shape[:2] == (2, 6 + 1)
    got = {}
    for step in (1, 2):
        logits = cache.step([tokens[2][step], tokens[0][step]])
        got[(0, 6 + step)], got[(1, 3 + step)] = logits[0], logits[1]
    assert_matches_full_pass(tiny_model, [prompts[2] + tokens[2], prompts[0] + tokens[0]], got)


def test_cache_holds_kda_states_and_compressed_latents_only(tiny_model):
    config = tiny_model.config
    cache = GenerationCache(tiny_model)
    cache.prefill(random_prompts([7, 4], seed=6))
    heads, head_dim, width = config.kda_num_heads, config.kda_head_dim, config.kda_short_conv_kernel_size
    for index, state in cache.layer_states.items():
        if config.is_kda_layer(index):
            assert isinstance(state, KDAState)
            assert state.recurrent.shape == (2, heads, head_dim, head_dim) and state.recurrent.dtype == torch.float32
            assert state.conv.shape == (2, 3 * heads * head_dim, width)
        else:
            assert isinstance(state, MLAState)
            assert state.latent.shape == (2, 7, config.kv_lora_rank)
            assert state.k_shared.shape == (2, 7, config.qk_rope_head_dim)
            assert state.valid.tolist() == [[True] * 7, [True] * 4 + [False] * 3]


def test_kda_memory_is_flat_in_context_length_and_mla_memory_linear(tiny_model):
    config = tiny_model.config
    sizes = {}
    for length in (4, 40):
        cache = GenerationCache(tiny_model)
        cache.prefill(random_prompts([length], seed=7))
        sizes[length] = cache.memory()
    assert sizes[4].kda_bytes == sizes[40].kda_bytes
    kda_layers = len(config.kda_layers)
    heads, head_dim, width = config.kda_num_heads, config.kda_head_dim, config.kda_short_conv_kernel_size
    per_layer = 4 * heads * head_dim**2 + 4 * 3 * heads * head_dim * width  # float32 recurrent + conv states
    assert sizes[4].kda_bytes == kda_layers * per_layer
    latent_bytes = 4 * (config.kv_lora_rank + config.qk_rope_head_dim) * len(config.full_attn_layers)
    assert sizes[40].mla_bytes - sizes[4].mla_bytes == 36 * latent_bytes


def test_misuse_is_refused(tiny_model):
    cache = GenerationCache(tiny_model)
    with pytest.raises(ValueError, match="every prompt at least one token"):
        cache.prefill([[1, 2], []])
    cache.prefill([[1, 2], [3]])
    with pytest.raises(ValueError, match="reset"):
        cache.prefill([[1]])
    with pytest.raises(ValueError, match="single sequence"):
        cache.extend([4, 5])
    with pytest.raises(ValueError, match="one token per sequence"):
        cache.step([1, 2, 3])
