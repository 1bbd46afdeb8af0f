"""Row norms and the SwiGLU product: fla-core's fused Triton kernels for CUDA tensors, PyTorch elsewhere.

    rms_norm(x [..., D], weight [D], eps)              -> weight * x / sqrt(mean(x^2) + eps)
    gated_rms_norm(x [..., D], gate [..., D], weight [D], eps) -> weight * rmsnorm(x) * sigmoid(gate)
    swiglu(gate [..., I], up [..., I])                 -> silu(gate) * up

Statistics are float32 on both paths. In PyTorch these are five to eight elementwise kernels each, and autograd
keeps the float32 intermediates for the backward; fla's kernels read the inputs once, write once and save only
the inputs and the per-row inverse RMS. The one difference in rounding: fla multiplies by the weight before the
single cast to the output dtype, the PyTorch RMSNorm casts first (as transformers does) — within bf16 rounding.

fla is used only when input and weight share a dtype (otherwise the result dtype follows PyTorch's promotion,
which the reference keeps) and it imports; without fla-core, or under ``kimitune.ops.force_reference``, the
PyTorch references (``*_reference``) run on CUDA too.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kimitune.ops import tuned_kernels
from kimitune.ops.reference_switch import use_kernels


@functools.cache
def _fla_modules() -> SimpleNamespace | None:
    try:
        from fla.modules.activations import swiglu
        from fla.modules.norm.fused_norm_gate import rms_norm_gated
        from fla.modules.norm.layernorm import rms_norm
    except ImportError:
        return None
    tuned_kernels.seed_after_import()  # this GPU's kept configs, before the kernels' first launch
    return SimpleNamespace(rms_norm=rms_norm, rms_norm_gated=rms_norm_gated, swiglu=swiglu)


def _fused(*tensors: torch.Tensor) -> SimpleNamespace | None:
    first = tensors[0]
    if not use_kernels(first) or any(t.dtype != first.dtype for t in tensors):
        return None
    return _fla_modules()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference (transformers' KimiLinear RMSNorm): normalise in float32, cast back, then scale."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def gated_rms_norm_reference(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: everything in float32, one cast to x's dtype at the end."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x * torch.sigmoid(gate.float())).to(dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference: silu(gate) * up in the inputs' dtype (autograd keeps both inputs and silu(gate))."""
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]."""
    fla = _fused(x, weight)
    if fla is None:
        return rms_norm_reference(x, weight, eps)
    return fla.rms_norm(x, weight, None, eps=eps)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, gate [..., D], weight [D] -> [..., D] in x's dtype."""
    fla = _fused(x, gate, weight)
    if fla is None:
        return gated_rms_norm_reference(x, gate, weight, eps)
    return fla.rms_norm_gated(x, gate, weight, None, activation="sigmoid", eps=eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] -> silu(gate) * up."""
    fla = _fused(gate, up)
    if fla is None:
        return swiglu_reference(gate, up)
    return fla.swiglu(gate, up)
