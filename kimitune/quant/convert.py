"""Which weights are quantised, and the in-place conversion of a model (or of one decoder layer).

Quantised: every ``nn.Linear`` (attention and KDA projections, dense MLP, shared expert) and both stacks of the
routed experts, which together are 99% of Kimi-Linear-48B's parameters. Left in the model's dtype, as
bitsandbytes' ``load_in_4bit`` / ``load_in_8bit`` and PEFT's QLoRA leave them:

- ``lm_head`` (``ALWAYS_SKIP``, whatever ``skip`` says): transformers skips the output embedding when quantising (its
  ``llm_int8_skip_modules`` default); the loss reads ``lm_head.weight`` directly, and logits are the most
  sensitive product of the model. ``embed_tokens`` too: a lookup, not a linear layer (no matmul to save).
- the norms, the router (``mlp.gate``, float32 routing: a rounding there changes which experts are chosen), the
  KDA short conv and forget-gate vectors ``A_log`` / ``dt_bias`` (exponentiated into decays, where a 1% error
  compounds over the sequence): all tiny (< 0.1% of the parameters), and none of them is an ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kimitune.quant.formats import FOUR_BIT_TYPES
from kimitune.quant.layers import QuantLinear
from kimitune.quant.weight import QuantizedWeight

ALWAYS_SKIP = ("lm_head",)
EXPERT_STACKS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class QuantSpec:
    """How frozen weights are stored: ``bits`` 8 (int8 per row, or float8 e4m3 per row with ``float8``) or 4
    (``quant_type`` nf4 | fp4, blockwise, ``double_quant`` also quantises the block scales: 0.5 instead of 4 bytes
    per 64 weights)."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    float8: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"quantisation bits must be 8 or 4, got {self.bits!r}")
        if self.quant_type not in FOUR_BIT_TYPES:
            raise ValueError(f"4-bit quant_type must be one of {FOUR_BIT_TYPES}, got {self.quant_type!r}")
        if self.float8 and self.bits != 8:
            raise ValueError("float8 weights have 8 bits")

    @classmethod
    def parse(cls, value: QuantSpec | str | int) -> QuantSpec:
        """A spec, 8 / 4, or '8bit' / 'int8' / 'fp8' / '4bit' / 'nf4' / 'fp4'."""
        if isinstance(value, QuantSpec):
            return value
        names = {"8bit": cls(8), "int8": cls(8), "8": cls(8), "fp8": cls(8, float8=True), "4bit": cls(4),
                 "nf4": cls(4), "4": cls(4), "fp4": cls(4, "fp4")}
        spec = names.get(str(value).lower())
        if spec is None:
            raise ValueError(f"quantization must be '8bit', 'fp8', '4bit', 'nf4' or 'fp4' (or 8 / 4), got {value!r}")
        return spec



def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """``name`` or one of its ancestors matches an entry (skipping a module skips what it holds)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else []
    return any(p == entry or p.endswith("." + entry) for p in prefixes for entry in skip)


def _is_float_expert_stack(module: nn.Module) -> bool:
    return callable(getattr(module, "project", None)) and all(
        isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).ndim == 3
        for name in EXPERT_STACKS
    )


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    spec: QuantSpec | str | int,
    skip: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Quantises, in place and on their devices, every ``nn.Linear`` of ``model`` and every stacked-experts
    module's ``gate_up_proj`` / ``down_proj``, except ``lm_head`` and the names in ``skip`` (PEFT's rule: the full
    name or a dotted suffix, relative to ``model``; a skipped module's children are skipped too). ``dtype``
    (default: each weight's own) is the dtype products compute in.
    Returns the quantised names. Works on a whole model or a single decoder layer; run it before adding LoRA.
    """
    if any(callable(getattr(m, "low_rank_terms", None)) or getattr(m, "adapters", None)
           for m in model.modules()):  # the model's adapter hooks (kimitune.model.projections, moe.GroupedExperts)
        raise ValueError("quantize_model_: the model already has LoRA adapters; quantise the base first, then "
                         "apply_lora")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model_ replaces linear layers inside a module: pass the module that holds it "
                         "(or use QuantLinear.from_linear)")
    spec = QuantSpec.parse(spec)
    args = dict(bits=spec.bits, quant_type=spec.quant_type, double_quant=spec.double_quant, dtype=dtype,
                float8=spec.float8)
    skip = ALWAYS_SKIP + tuple(skip)
    done = []
    for name, module in list(model.named_modules()):
        if _skipped(name, skip) or isinstance(module, QuantLinear):
            continue
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, QuantLinear.from_linear(module, **args))
            done.append(name)
        elif _is_float_expert_stack(module):
            for stack in EXPERT_STACKS:
                quantized = QuantizedWeight.quantize(getattr(module, stack).detach(), **args)
                delattr(module, stack)  # the Parameter goes (and its memory with it), the module takes its name
                setattr(module, stack, quantized)
                done.append(f"{name}.{stack}" if name else stack)
    return done


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every quantised weight of ``model`` by name (``<linear>.weight``, ``<experts>.gate_up_proj``, ...)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedWeight) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (quantised weights at their stored size)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
