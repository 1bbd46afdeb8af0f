"""The MoE router's logits in float32: ``router_logits(x [N, C], weight [E, C]) -> [N, E]`` float32.

Routing takes its top-k on these logits, so they are float32 whatever the model's dtype (transformers computes
``F.linear(x.float(), weight.float())``: a rounding there changes which experts are chosen). On CUDA, with x and
weight in bf16 or fp16, one tensor-core GEMM with float32 accumulation and a float32 output (``torch.mm``'s
``out_dtype``) gives the same products: each is exact in float32, as it is after upcasting, only the order of the
sums may differ. This path exists because the float32 GEMM of upcast operands (:func:`router_logits_reference`,
the path elsewhere and under ``kimitune.ops.force_reference``) runs without tensor cores: a measurable part of a
48B step (figures in benchmarks/RESULTS.md).

The input gradient ``grad @ weight`` is computed in x's dtype: it joins the residual stream's gradient there, as
every other bf16 layer's does. A weight that trains (full fine-tuning) gets its float32 gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimitune.ops.reference_switch import use_kernels

_HALF = (torch.bfloat16, torch.float16)


def _tensor_core_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return use_kernels(x) and x.dtype in _HALF and weight.dtype == x.dtype


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.mm(x, weight.T, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad.to(x.dtype) @ weight if ctx.needs_input_grad[0] else None
        grad_w = (grad.T @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def router_logits_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The reference (transformers' computation): x [N, C], weight [E, C] upcast, then [N, E] float32."""
    return F.linear(x.float(), weight.float())


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, C], weight [E, C] -> x weight^T [N, E] in float32 (see the module docstring)."""
    if _tensor_core_path(x, weight):
        return _RouterLogits.apply(x, weight)
    return router_logits_reference(x, weight)
