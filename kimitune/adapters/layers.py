"""LoRA layers: a linear layer and a stack of experts with low-rank updates (the maths; no targeting, no I/O).

A linear layer ``y = x W^T + b`` becomes ``y = x W^T + b + s * dropout(x) A^T B^T`` with ``A`` [r, in]
(Kaiming-uniform, as PEFT) and ``B`` [out, r] (zeros), so a fresh adapter leaves the model unchanged. The scale
``s`` is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. The adapter is stored in float32 whatever the base
dtype; its products run in the base's compute dtype (``lora_compute_dtype``).

Stacked experts get one independent adapter per expert and projection: ``A`` [E, r, in], ``B`` [E, out, r], and
expert ``e`` computes ``x W_e^T + s * dropout(x) A_e^T B_e^T``. This is what PEFT 0.21 computes for
``target_parameters`` on transformers' ``KimiLinearExperts`` (``W_e + s * B_e A_e``, same ``r``, same scale),
stored in another layout (``peft_format.py`` converts).

Base parameters keep their names (``q_proj.weight`` stays ``q_proj.weight``). A quantised base (QLoRA,
``kimitune.quant``) works the same way: its ``weight`` is a ``QuantizedWeight`` module taken over like a
Parameter, and ``base_output`` computes through ``kimitune.quant.matmul``'s frozen products, which take both.
Adapter parameters: ``<linear>.lora_A`` [r, in], ``<linear>.lora_B`` [out, r];
``<experts>.adapters.<projection>.lora_A`` [E, r, in], ``...lora_B`` [E, out, r] with projection ``gate_up_proj`` or
``down_proj`` (the experts module's adapter hook, ``kimitune.model.moe.GroupedExperts``).

Extension point (CE-LoRA): an adapted layer computes both terms itself, the frozen product in ``base_output``
and the low-rank one in ``lora_output`` (``LoraLinear`` and ``ExpertsLora`` alike); a variant that changes
how either is differentiated subclasses them and hands its classes to
``apply_lora(..., linear_cls=..., experts_lora_cls=...)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kimitune.adapters.casts import AdapterCasts
from kimitune.model.projections import LowRankTerms
from kimitune.ops.grouped_mm import grouped_linear
from kimitune.ops.shared_input_lora import shared_input_lora
from kimitune.quant.matmul import frozen_grouped_linear, frozen_linear

LORA_DTYPE = torch.float32


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023), else ``alpha / r``, as PEFT."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the low-rank products run in: autocast's inside an autocast region, else the input's, but never
    below float32 for float32 input. The adapter's Parameters stay float32 (optimizer and updates are exact); the
    products run at the frozen layer's precision, as under PEFT with autocast. Computing them in float32 from bf16
    activations, as PEFT does without autocast, costs a float32 copy of every adapted layer's input (kept for the
    backward) and float32 GEMMs (benchmarks/RESULTS.md, GPU training, has the before and after)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.promote_types(x.dtype, LORA_DTYPE)


def _init_lora_a(weight: torch.Tensor) -> None:
    # PEFT's default init: Kaiming-uniform with a=sqrt(5) over [rows, in] (expert stacks as [E*r, in]).
    nn.init.kaiming_uniform_(weight.view(-1, weight.shape[-1]), a=math.sqrt(5))


@torch.no_grad()
def fold_into(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight += delta`` with the sum formed in (at least) float32 and rounded once to ``weight``'s dtype."""
    dtype = torch.promote_types(weight.dtype, LORA_DTYPE)
    weight.copy_((weight.to(dtype) + delta.to(dtype)).to(weight.dtype))


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoraLinear(nn.Module):
    """A linear layer with a low-rank update; takes over the base layer's ``weight`` and ``bias`` Parameters.

    Shapes: ``weight`` [out, in], ``lora_A`` [r, in], ``lora_B`` [out, r]; input [..., in], output [..., out].
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 join_shared_input: bool = True):
        super().__init__()
        self.join_shared_input = join_shared_input
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=LORA_DTYPE))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=LORA_DTYPE))
        self.lora_dropout = _dropout(dropout)
        _init_lora_a(self.lora_A.data)
        self.adapter_casts: AdapterCasts | None = None  # set by apply_lora

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b``: the frozen product (``weight`` a Parameter or a quantised ``QuantizedWeight``)."""
        return frozen_linear(x, self.weight, self.bias)

    def adapter_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` in ``dtype``: the model's shared copies (``casts.py``) when ``apply_lora`` made it."""
        if self.adapter_casts is not None:
            return self.adapter_casts.weights(self, dtype)
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def _down(self, x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        """``dropout(x) A^T`` [..., r] in ``lora_a``'s dtype (the compute dtype)."""
        return F.linear(self.lora_dropout(x).to(lora_a.dtype), lora_a)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * dropout(x) A^T B^T`` in the compute dtype (see ``lora_compute_dtype``)."""
        lora_a, lora_b = self.adapter_weights(lora_compute_dtype(x))
        return F.linear(self._down(x, lora_a) * self.scaling, lora_b)

    def low_rank_terms(self, x: torch.Tensor) -> LowRankTerms | None:
        """The model's joint-projection hook (``kimitune.model.projections``): this layer's terms when it can run
        with its siblings of one input: a plain ``LoraLinear`` (not a variant), no bias, no dropout, a frozen plain
        weight in x's dtype, which is the compute dtype; else None. ``join_shared_input=False`` always says None
        (every linear then runs by itself, as the tests compare)."""
        joins = (
            self.join_shared_input
            and type(self) is LoraLinear
            and self.bias is None
            and isinstance(self.lora_dropout, nn.Identity)
            and type(self.weight) in (torch.Tensor, nn.Parameter)
            and not self.weight.requires_grad
            and self.weight.dtype == x.dtype
            and self.weight.device == x.device
            and lora_compute_dtype(x) == x.dtype
        )
        if not joins:
            return None
        lora_a, lora_b = self.adapter_weights(x.dtype)
        return LowRankTerms(self.weight, lora_a, lora_b, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        terms = self.low_rank_terms(x)
        if terms is not None:  # alone through the joint node: one accumulated input gradient, not two GEMMs and an add
            y, = shared_input_lora(x.reshape(-1, self.in_features), terms.scaling, [1], [terms.weight],
                                   [terms.lora_a], [terms.lora_b])
            return y.view(*x.shape[:-1], self.out_features)
        base = self.base_output(x)
        dtype = lora_compute_dtype(x)
        if base.dtype != dtype:
            return base + self.lora_output(x).to(base.dtype)
        lora_a, lora_b = self.adapter_weights(dtype)
        # The second low-rank GEMM adds s * down B^T to the frozen product in its epilogue, instead of a scale and
        # an add that each pass over the [..., out] output again. In place: the out-of-place addmm first copies the
        # frozen product into its result (an extra pass); autograd keeps no reference to that product.
        down = self._down(x, lora_a)
        base.view(-1, self.out_features).addmm_(down.reshape(-1, self.r), lora_b.T, alpha=self.scaling)
        return base

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` [out, in] in the adapter's dtype: what merging adds to ``weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` owning this layer's Parameters, with the update folded into ``weight``."""
        fold_into(self.weight, self.delta_weight())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class ExpertsLora(nn.Module):
    """One rank-``r`` adapter per expert for one stacked projection of ``E`` experts.

    Shapes: ``lora_A`` [E, r, in], ``lora_B`` [E, out, r]; ``forward(weight [E, out, in], x [N, in], offsets [E])
    -> [N, out]`` with the rows of ``x`` sorted by expert and ``offsets`` the int32 cumulative row ends, as the
    experts' ``project`` takes them. Like ``LoraLinear`` it computes the frozen product too, so that a variant
    can change how that product is differentiated.
    """

    def __init__(self, base_weight: torch.Tensor, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        num_experts, out_features, in_features = base_weight.shape
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = base_weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=LORA_DTYPE))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device, dtype=LORA_DTYPE))
        self.lora_dropout = _dropout(dropout)
        _init_lora_a(self.lora_A.data)

    def base_output(self, weight: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``x W_e^T`` per expert group: the frozen product (``weight`` a Parameter or a ``QuantizedWeight``)."""
        return frozen_grouped_linear(x, weight, offsets)

    def lora_output(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``s * dropout(x) A_e^T B_e^T`` per expert group, in the compute dtype (see ``lora_compute_dtype``)."""
        dtype = lora_compute_dtype(x)
        x = self.lora_dropout(x).to(dtype)
        hidden = grouped_linear(x, self.lora_A.to(dtype), offsets) * self.scaling
        return grouped_linear(hidden, self.lora_B.to(dtype), offsets)

    def forward(self, weight: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        base = self.base_output(weight, x, offsets)
        return base + self.lora_output(x, offsets).to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s * B_e A_e`` for every expert, [E, out, in] in the adapter's dtype."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, r={self.r}"
