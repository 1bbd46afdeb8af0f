"""Helpers for the model tests: a micro architecture and a way to perturb every weight."""

from __future__ import annotations

import torch

from kimitune import KimiLinearConfig


def micro_config(**overrides) -> KimiLinearConfig:
    """4 layers (KDA, KDA, KDA, MLA), first dense, 8 experts in 2 groups (top-2 within the best group)."""
    values = dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        kda_layers=[1, 2, 3], full_attn_layers=[4], kda_num_heads=2, kda_head_dim=16,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        num_experts=8, num_experts_per_token=2, moe_intermediate_size=16, num_shared_experts=1,
        num_expert_group=2, topk_group=1, bos_token_id=250, eos_token_id=251, pad_token_id=255, dtype="float32",
    )
    values.update(overrides)
    return KimiLinearConfig(**values)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Moves every parameter and buffer away from its initial value (norm weights, A_log, dt_bias and the router
    bias included), so that no part of the computation is hidden behind ones or zeros."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        scale = 0.3 if ("bias" in name or "A_log" in name or "norm" in name) else 0.05
        tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected|: float32 round-off, judged against the tensor's size."""
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol} * {scale:.3g}"


def perturbed_micro_model(lora: bool, **overrides) -> torch.nn.Module:
    """The micro model (``micro_config(**overrides)``) from seed 0, LoRA (r 4, every linear) on it if ``lora``, then
    perturbed."""
    from kimitune import KimiLinearForCausalLM
    from kimitune.adapters.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(micro_config(**overrides))
    if lora:
        apply_lora(model, LoraSettings(r=4, alpha=8, target_linear=True))
    return perturb_(model)
