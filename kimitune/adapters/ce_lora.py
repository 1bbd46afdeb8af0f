"""CE-LoRA (Chen et al., arXiv 2502.01378): LoRA whose backward approximates the frozen weights' input gradient.

    settings = lora_settings(config)                        # kimitune.train.settings: rank, scale, dropout, targets: as LoRA
    ce = ce_lora_settings(config)                           # ce_lora_sparsity, _double_rank, _refresh_steps, _adaptive
    names = apply_ce_lora(model, settings, ce)              # LoRA layers whose frozen product has a cheaper backward
    ...train...
    save_adapter(model, out_dir, settings)                  # a plain PEFT-format LoRA adapter

The forward is LoRA's, exactly. In the backward, the input gradient through each adapted module's frozen weight,
``dX = dY W`` (the costliest product of LoRA's backward), is computed by ``ce_amm.RowSampledInputGrad`` over the
``k`` most important rows of ``W`` plus a fixed low-rank (Double-LoRA) stand-in for the rest; the LoRA branch's
own gradients (``lora_A``, ``lora_B`` and its share of ``dX``) stay exact. Every layer LoRA adapts can be
approximated, the stacked MoE experts included (per expert, in the grouped matmul's backward).

The Double-LoRA factors, the selection and the gathered rows are non-persistent buffers rebuilt from the frozen
weights, so what is trained and saved is an ordinary LoRA adapter (``save_adapter``, ``merge_lora`` as LoRA's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kimitune.adapters.ce_amm import (
    ApproxGroupedLinearFunction,
    ApproxLinearFunction,
    RowSampledInputGrad,
    kept_row_count,
)
from kimitune.adapters.layers import ExpertsLora, LoraLinear
from kimitune.adapters.lora import LoraSettings, apply_lora, lora_modules
from kimitune.adapters.targets import LoraTargetError, name_matches



@dataclass
class CeLoraSettings:
    """CE-LoRA's hyperparameters (the LoRA ones stay in ``LoraSettings``).

    - ``sparsity``: the fraction of each frozen weight's output rows left out of the input-gradient product
      (0 keeps the exact product). A mapping gives it per module, ``{target name: sparsity}``, names matched as in
      ``lora_target_modules`` (``v_proj``, ``layers.3.self_attn.o_proj``, ``experts``, ``experts.down_proj``; the
      longest matching entry wins); an adapted module that no entry names stays exact, as in the authors' scripts.
    - ``double_rank``: rank ``r0`` of the fixed Double-LoRA pair (truncated SVD of ``W``); ``None`` is the
      authors' default ``7/8 * lora_r``; 0 turns Double-LoRA off. Rounded up to a multiple of 8, at most
      ``min(out, in)``.
    - ``refresh_steps``: backward passes (micro-batches) between two choices of the kept rows.
    - ``adaptive``: layer-wise adaptive sparsity: at each refresh a layer keeps the fewest rows whose importance
      scores hold ``1 - sparsity`` of its total, so layers with concentrated importance drop more rows (never
      fewer than ``sparsity`` says).
    """

    sparsity: float | Mapping[str, float] = 0.5
    double_rank: int | None = None
    refresh_steps: int = 200
    adaptive: bool = False

    def __post_init__(self) -> None:
        values = self.sparsity.items() if isinstance(self.sparsity, Mapping) else [(None, self.sparsity)]
        for name, value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                key = "ce_lora_sparsity" if name is None else f"ce_lora_sparsity[{name!r}]"
                raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
        if self.double_rank is not None and (not isinstance(self.double_rank, int) or self.double_rank < 0):
            raise ValueError(f"ce_lora_double_rank must be a non-negative integer or null, got {self.double_rank!r}")
        if not isinstance(self.refresh_steps, int) or self.refresh_steps <= 0:
            raise ValueError(f"ce_lora_refresh_steps must be a positive integer, got {self.refresh_steps!r}")

    def entries(self) -> list[tuple[str, float]]:
        """The mapping's ``(name, sparsity)`` entries, longest name first (empty for one number)."""
        entries = self.sparsity.items() if isinstance(self.sparsity, Mapping) else ()
        return sorted(((name, float(value)) for name, value in entries), key=lambda entry: -len(entry[0]))

    def sparsity_for(self, name: str, experts: bool = False) -> float:
        """The sparsity of adapted module ``name``: ``<linear>``, or ``<experts>.<projection>`` with ``experts``."""
        if not isinstance(self.sparsity, Mapping):
            return float(self.sparsity)
        return next((value for entry, value in self.entries() if entry_matches(name, entry, experts)), 0.0)

    def double_rank_for(self, lora_r: int) -> int:
        return lora_r * 7 // 8 if self.double_rank is None else self.double_rank


def entry_matches(name: str, entry: str, experts: bool) -> bool:
    """``lora_target_modules``' rule (``targets.py``): an expert projection ``<experts>.<projection>`` is named by
    its experts module or by a dotted suffix of its own name, never by a bare ``gate_up_proj`` / ``down_proj``."""
    if experts:
        return name_matches(name.rpartition(".")[0], entry) or ("." in entry and name_matches(name, entry))
    return name_matches(name, entry)


class CeLoraLinear(LoraLinear):
    """``LoraLinear`` whose frozen product's input gradient is approximated once ``approximate`` has been called."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 join_shared_input: bool = True):
        super().__init__(base, r, alpha, dropout, use_rslora, join_shared_input)
        self.approx: RowSampledInputGrad | None = None

    def approximate(self, sparsity: float, double_rank: int, refresh_steps: int, adaptive: bool) -> None:
        """Turns the approximation on (a no-op when ``sparsity`` keeps every row)."""
        if kept_row_count(self.out_features, sparsity) < self.out_features:
            self.approx = RowSampledInputGrad(self.weight, sparsity, double_rank, refresh_steps, adaptive)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        if self.approx is None or not torch.is_grad_enabled():
            return super().base_output(x)
        _check_frozen(self.weight, self.bias)
        return ApproxLinearFunction.apply(x, self.weight, self.bias, self.approx)


class CeExpertsLora(ExpertsLora):
    """``ExpertsLora`` whose grouped frozen product's input gradient is approximated per expert."""

    def __init__(self, base_weight: torch.Tensor, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_weight, r, alpha, dropout, use_rslora)
        self.approx: RowSampledInputGrad | None = None

    def approximate(
        self, weight: torch.Tensor, sparsity: float, double_rank: int, refresh_steps: int, adaptive: bool
    ) -> None:
        """Turns the approximation on for the stack ``weight`` [E, out, in] (a no-op when every row is kept)."""
        if kept_row_count(self.out_features, sparsity) < self.out_features:
            self.approx = RowSampledInputGrad(weight, sparsity, double_rank, refresh_steps, adaptive)

    def base_output(self, weight: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.approx is None or not torch.is_grad_enabled():
            return super().base_output(weight, x, offsets)
        _check_frozen(weight)
        return ApproxGroupedLinearFunction.apply(x, weight, offsets, self.approx)


def _check_frozen(*tensors: torch.Tensor | None) -> None:
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):  # a QuantizedWeight is frozen
        raise RuntimeError("CE-LoRA approximates the input gradient of frozen weights only, but a base weight "
                           "requires grad: freeze it (apply_ce_lora freezes every base parameter)")


def apply_ce_lora(model: nn.Module, settings: LoraSettings, ce: CeLoraSettings) -> list[str]:
    """Adds CE-LoRA adapters where ``settings`` points (as ``apply_lora``) and freezes everything else; returns the
    adapted names. Raises ``LoraTargetError`` for a ``ce.sparsity`` entry that names no adapted module."""
    targets = settings.targets(model)
    adapted = [(name, False) for name in targets.linears] + [(".".join(pair), True) for pair in targets.experts]
    for entry, _ in ce.entries():
        if not any(entry_matches(name, entry, experts) for name, experts in adapted):
            raise LoraTargetError(
                f"ce_lora_sparsity entry {entry!r} matches no adapted module (as in lora_target_modules, a name "
                f"matches when it equals the full name or ends with '.{entry}'; experts are named by their module, "
                "'experts', or by 'experts.gate_up_proj' / 'experts.down_proj')"
            )
    names = apply_lora(model, settings, linear_cls=CeLoraLinear, experts_lora_cls=CeExpertsLora)
    rank = ce.double_rank_for(settings.r)
    for name, module in lora_modules(model).items():
        if isinstance(module, CeExpertsLora):
            experts_name, _, projection = name.rpartition(".")
            weight = getattr(model.get_submodule(experts_name), projection)
            module.approximate(weight, ce.sparsity_for(name, experts=True), rank, ce.refresh_steps, ce.adaptive)
        else:
            module.approximate(ce.sparsity_for(name), rank, ce.refresh_steps, ce.adaptive)
    return names


def approximated_modules(model: nn.Module) -> dict[str, RowSampledInputGrad]:
    """The approximated products of ``model`` by adapted name, in model order (exact ones left out)."""
    return {
        name: module.approx
        for name, module in lora_modules(model).items()
        if isinstance(module, (CeLoraLinear, CeExpertsLora)) and module.approx is not None
    }


__all__ = [
    "CeExpertsLora",
    "CeLoraLinear",
    "CeLoraSettings",
    "apply_ce_lora",
    "approximated_modules",
]
