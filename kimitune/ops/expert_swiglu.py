"""The routed experts' activation, with each row's routing weight applied before the down projection.

    expert_swiglu(gate_up [M, 2I], weights [M] float32) -> h [M, I] in gate_up's dtype
        h[m] = silu(gate_up[m, :I]) * gate_up[m, I:] * weights[m]

A MoE layer's output is sum_j w_j * down_j(swiglu_j): the down projection (with its LoRA, also for quantised
weights) is linear, so the weight can scale the SwiGLU rows instead of the expert outputs, and the combine becomes a
plain sum (``kimitune.ops.expert_combine``). Then the weights' gradient, <grad h, silu(gate) * up> per row, needs
only the gate_up rows that the SwiGLU's own backward keeps anyway; weighting the outputs instead keeps every expert
output row ([M, C], M = k tokens) alive until the backward, 151 MB per layer at 4096 tokens of the 48B widths.

Arithmetic is float32, rounded once. On CUDA one Triton kernel per direction, one program per row: the forward
reads gate and up and writes h; the backward reads them with grad h and writes the gradient of gate_up as one
[M, 2I] tensor (no concatenation of two halves) and the weights' gradient. :func:`expert_swiglu_reference` is the
same in PyTorch ops: the path off CUDA and under ``kimitune.ops.force_reference``, and the tests' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimitune.ops.reference_switch import use_kernels
from kimitune.ops.triton_utils import block_size, jit_on_first_use

tl = None  # triton.language, bound at the kernels' first launch (triton_utils)

BLOCK_I = 1024  # columns per step of a row's loop; I = 1024 in the released model
NUM_WARPS = 4


def expert_swiglu_reference(gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """PyTorch version of :func:`expert_swiglu` (same arguments and result), differentiable by autograd."""
    gate, up = gate_up.chunk(2, dim=-1)
    acc = torch.promote_types(gate_up.dtype, torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc) * weights.to(acc)[:, None]).to(gate_up.dtype)


def _expert_swiglu_forward_kernel(gu_ptr, w_ptr, h_ptr, I: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row m: h[m] = silu(gu[m, :I]) * gu[m, I:] * w[m]."""
    m = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + m).to(tl.float32)
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_i = cols < I
        g = tl.load(gu_ptr + m * 2 * I + cols, mask=in_i, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + m * 2 * I + I + cols, mask=in_i, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u * w
        tl.store(h_ptr + m * I + cols, h.to(h_ptr.dtype.element_ty), mask=in_i)


def _expert_swiglu_backward_kernel(gu_ptr, w_ptr, dh_ptr, dgu_ptr, dw_ptr, I: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row m: the gradients of gate and up (into dgu[m]) and dw[m] = <dh[m], silu(gate) * up>."""
    m = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + m).to(tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_i = cols < I
        g = tl.load(gu_ptr + m * 2 * I + cols, mask=in_i, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + m * 2 * I + I + cols, mask=in_i, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + m * I + cols, mask=in_i, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        dot += dh * silu * u
        dg = dh * w * u * s * (1.0 + g * (1.0 - s))
        du = dh * w * silu
        tl.store(dgu_ptr + m * 2 * I + cols, dg.to(dgu_ptr.dtype.element_ty), mask=in_i)
        tl.store(dgu_ptr + m * 2 * I + I + cols, du.to(dgu_ptr.dtype.element_ty), mask=in_i)
    tl.store(dw_ptr + m, tl.sum(dot, axis=0))


_forward = jit_on_first_use(_expert_swiglu_forward_kernel)
_backward = jit_on_first_use(_expert_swiglu_backward_kernel)


def _sizes(gate_up: torch.Tensor, weights: torch.Tensor) -> dict:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or weights.shape != gate_up.shape[:1]:
        raise ValueError(f"expert_swiglu: gate_up {tuple(gate_up.shape)} must be [M, 2I] and weights "
                         f"{tuple(weights.shape)} [M]")
    width = gate_up.shape[1] // 2
    return {"I": width, "BLOCK": block_size(width, cap=BLOCK_I)}


def expert_swiglu_forward_triton(gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The forward kernel (CUDA, or CPU under TRITON_INTERPRET=1): -> h [M, I] in gate_up's dtype."""
    sizes = _sizes(gate_up, weights)
    h = gate_up.new_empty(gate_up.shape[0], sizes["I"])
    if gate_up.shape[0]:
        _forward[(gate_up.shape[0],)](gate_up.contiguous(), weights.contiguous(), h, **sizes, num_warps=NUM_WARPS)
    return h


def expert_swiglu_backward_triton(gate_up: torch.Tensor, weights: torch.Tensor,
                                  grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel: -> (grad gate_up [M, 2I] in its dtype, grad weights [M] float32)."""
    sizes = _sizes(gate_up, weights)
    grad_gate_up = torch.empty_like(gate_up)
    grad_w = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
    if gate_up.shape[0]:
        _backward[(gate_up.shape[0],)](gate_up.contiguous(), weights.contiguous(), grad_h.contiguous(), grad_gate_up,
                                       grad_w, **sizes, num_warps=NUM_WARPS)
    return grad_gate_up, grad_w


class _ExpertSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up, weights)
        return expert_swiglu_forward_triton(gate_up, weights)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        gate_up, weights = ctx.saved_tensors
        grad_gate_up, grad_w = expert_swiglu_backward_triton(gate_up, weights, grad_h)
        return grad_gate_up, grad_w.to(weights.dtype)


def expert_swiglu(gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2I] (the gate_up projection's rows: gate then up), weights [M] -> h [M, I] (module docstring)."""
    if use_kernels(gate_up) and gate_up.dtype != torch.float64:
        return _ExpertSwiGLU.apply(gate_up, weights)
    return expert_swiglu_reference(gate_up, weights)
