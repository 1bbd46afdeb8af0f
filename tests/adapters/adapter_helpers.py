"""Tiny transformers KimiLinearForCausalLM models (the reference) and helpers shared by the adapter tests.

transformers' experts compute inside ``forward``; ``ProjectingExperts`` is the same maths routed through
``project(name, x, offsets)`` (the hook kimitune's experts expose), so our expert LoRA can run on the reference
model too, while a pristine reference model + PEFT checks what we save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearExperts

from kimitune import KimiLinearConfig
from kimitune.adapters import lora_modules
from kimitune.ops.grouped_mm import grouped_linear

HIDDEN, EXPERTS, MOE_INTERMEDIATE = 64, 4, 24


def tiny_config() -> KimiLinearConfig:
    """Three layers: KDA + dense MLP, MLA + MoE, KDA + MoE; 4 experts, top-2; 2I (48) != H (64)."""
    return KimiLinearConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3,
        kda_layers=[1, 3], full_attn_layers=[2], kda_num_heads=2, kda_head_dim=16,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, num_experts=EXPERTS, num_experts_per_token=2, moe_intermediate_size=MOE_INTERMEDIATE,
        num_shared_experts=1, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32",
    )


def tiny_hf_config() -> transformers.KimiLinearConfig:
    """transformers' reading of ``tiny_config``'s config.json."""
    return transformers.KimiLinearConfig(**tiny_config().to_dict())


class ProjectingExperts(KimiLinearExperts):
    """transformers' experts, computed through ``project`` on rows sorted by expert (as kimitune's experts)."""

    def project(self, name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if name in self.adapters:  # the adapter hook of kimitune's GroupedExperts
            return self.adapters[name](getattr(self, name), x, offsets)
        return grouped_linear(x, getattr(self, name), offsets)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        top_k = top_k_index.shape[1]
        chosen = top_k_index.reshape(-1)
        order = torch.argsort(chosen, stable=True)
        offsets = torch.bincount(chosen, minlength=self.num_experts).cumsum(0).to(torch.int32)
        gate, up = self.project("gate_up_proj", hidden_states[order // top_k], offsets).chunk(2, dim=-1)
        out = self.project("down_proj", F.silu(gate) * up, offsets) * top_k_weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden_states).index_add_(0, order // top_k, out.to(hidden_states.dtype))


def hf_model(seed: int = 0, projecting: bool = False) -> transformers.KimiLinearForCausalLM:
    """A float32 eval-mode reference model with weights drawn from ``seed``; ``projecting`` swaps in
    ``ProjectingExperts`` (same weights, same maths)."""
    torch.manual_seed(seed)
    model = transformers.KimiLinearForCausalLM(tiny_hf_config()).float().eval()
    if projecting:
        for module in model.modules():
            if isinstance(module, KimiLinearExperts):
                module.__class__ = ProjectingExperts
                module.adapters = torch.nn.ModuleDict()
    return model


def randomize_lora(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero adapters (a fresh B is zero, which would hide layout mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            for param in (module.lora_A, module.lora_B):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of either model (kimitune's returns an output object, transformers' too)."""
    with torch.no_grad():
        return model(input_ids).logits


def token_ids(seed: int = 7, vocab_size: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))

