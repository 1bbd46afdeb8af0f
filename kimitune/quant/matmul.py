"""The frozen products, for float and quantised weights alike: the one place that computes ``x W^T``.

    frozen_linear(x [..., in], weight [out, in], bias [out] | None) -> [..., out]
    frozen_grouped_linear(x [N, in] sorted by expert, weight [E, out, in], offsets [E] int32) -> [N, out]

A float ``weight`` goes to ``F.linear`` / ``grouped_linear`` as before. A ``QuantizedWeight`` goes through an
autograd Function that dequantises it in the forward, multiplies, and lets the dequantised copy go; the
backward dequantises it again for ``dX = dY W`` (the weight is frozen: no dW, so nothing of the weight needs
saving). Activation memory is therefore what the float layer would save minus the weight itself, and an
expert stack exists dequantised only while its own product runs: one projection of one layer at a time, in the
forward, in a checkpointed layer's recomputation and in the backward alike.

The dequantisation and the products are ours rather than ``bitsandbytes.matmul_4bit`` / ``Linear8bitLt``:
those cover linear layers only (not the stacked experts' grouped matmul), ``Linear8bitLt`` computes in
float16 with int8 matmuls on CUDA and has no CPU training path, and ``matmul_4bit`` keeps its own backward.
One explicit dequantise-then-matmul runs the same on CPU (float32) and CUDA (bf16) for both layer kinds.

An fp8 weight of a linear layer on CUDA multiplies in FP8 instead (``Fp8LinearFunction``, Hopper's FP8 tensor cores
through ``torch._scaled_mm``): the input is scaled to e4m3 per row on the fly, and the weight's e4m3 values and row
scales are used as stored. The backward is FP8 too and exact in the weight: dX = dY W = (dY diag(s)) W_q, so the output
gradient's columns are multiplied by the weight's row scales, that product is scaled to e4m3 per row, and it meets
the stored W_q (transposed into the layout ``_scaled_mm`` takes). Only the activations and gradients are rounded to
e4m3 (about 2% per product). ``kimitune.ops.force_reference`` (or a width that is not a multiple of 16, or the CPU)
takes the dequantising path.

An int8 or fp8 expert stack on CUDA goes through ``kimitune.ops.quant_grouped_mm.row_scaled_grouped_mm``: a Triton
grouped product that dequantises each weight tile in registers (to exactly the values ``dequantize`` gives) and
multiplies in bf16, forward and input gradient alike, so no dequantised stack is ever written (measured against
dequantise-then-``_grouped_mm`` and ``torch._scaled_grouped_mm`` in benchmarks/fp8_grouped.py). 4-bit stacks, the
CPU and ``force_reference`` dequantise the whole stack as above.

The compute dtype is autocast's inside an autocast region, else the weight's ``dtype`` (the model's dtype when
it was quantised: bf16 on a GPU, float32 on the CPU); results come back in that dtype, input gradients in the
input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from kimitune.ops.fp8_rows import quantize_rows_e4m3
from kimitune.ops.grouped_mm import grouped_linear
from kimitune.ops.quant_grouped_mm import row_scaled_grouped_mm
from kimitune.ops.reference_switch import use_kernels
from kimitune.quant.formats import FP8_MAX, quantize_rows_fp8
from kimitune.quant.weight import QuantizedWeight


def compute_dtype(x: torch.Tensor, weight: QuantizedWeight) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def dequantized(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A float view of a frozen weight: the tensor itself, or a fresh dequantised copy (for code that needs the
    numbers, e.g. CE-LoRA's SVD; products should use ``frozen_linear`` / ``frozen_grouped_linear``)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight


class DequantLinearFunction(Function):
    """``x W^T + b`` with ``W`` dequantised on the fly; saves nothing of ``W`` (and not ``x``: dW is not needed)."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, bias, dtype: torch.dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_output.to(ctx.dtype) @ ctx.weight.dequantize(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


class Fp8LinearFunction(Function):
    """``x W^T + b`` for an fp8 ``W`` [out, in] as FP8 products, forward and input gradient (the module docstring);
    saves nothing of ``x`` or ``W``. The activations and output gradients are scaled to e4m3 by
    ``kimitune.ops.fp8_rows`` (one kernel; ``formats.quantize_rows_fp8`` is its reference). ``x`` [N, in] -> [N, out]
    in ``dtype``: 2-D, so that the output is no view made inside the Function, which autograd would forbid the LoRA's
    in-place add on (``frozen_linear`` reshapes)."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, bias, dtype: torch.dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        x_q, x_scale = _e4m3_rows(x, None)
        w_q, w_scale = _fp8_parts(weight)
        y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale[None, :], out_dtype=dtype)
        return y if bias is None else y + bias.to(dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = grad_bias = None
        flat = grad_output
        if ctx.needs_input_grad[0]:
            w_q, w_scale = _fp8_parts(ctx.weight)
            g_q, g_scale = _e4m3_rows(flat, w_scale)  # dY diag(s): W's scales moved over
            ones = torch.ones(1, w_q.shape[1], dtype=torch.float32, device=w_q.device)
            # b must be column-major: W_q^T stored row-major, transposed back
            grad_x = torch._scaled_mm(g_q, w_q.t().contiguous().t(), scale_a=g_scale, scale_b=ones,
                                      out_dtype=ctx.dtype)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def _e4m3_rows(x: torch.Tensor, column_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] (times ``column_scale`` [K]) scaled to e4m3 per row -> (q [N, K], scale [N, 1]): the one-kernel
    ``quantize_rows_e4m3`` on CUDA, its reference ``quantize_rows_fp8`` elsewhere (the CPU tests' forced FP8
    products)."""
    if x.is_cuda:
        return quantize_rows_e4m3(x, column_scale, FP8_MAX)
    return quantize_rows_fp8(x if column_scale is None else x.float() * column_scale[None, :])


def _fp8_parts(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp8 weight's e4m3 values [out, in] and float32 row scales [out] (views of its stored bits)."""
    return weight.data.view(torch.float8_e4m3fn), weight.scale.view(torch.float32)


def fp8_products_apply(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether ``frozen_linear`` multiplies in FP8: an fp8 matrix, CUDA kernels allowed, widths multiples of 16
    (``_scaled_mm``'s rule)."""
    return weight.format == "fp8" and weight.ndim == 2 and use_kernels(x) and \
        weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


class DequantGroupedLinearFunction(Function):
    """``grouped_linear(x, W, offsets)`` with the stack ``W`` dequantised on the fly; saves only ``offsets``."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, offsets, dtype: torch.dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.save_for_backward(offsets)
        with torch.autocast(x.device.type, enabled=False):
            return grouped_linear(x.to(dtype), weight.dequantize(dtype), offsets)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (offsets,) = ctx.saved_tensors
        stack = ctx.weight.dequantize(ctx.dtype)  # [E, out, in]; dX_e = dY_e W_e
        grad_x = grouped_linear(grad_output.to(ctx.dtype), stack.transpose(1, 2), offsets)
        del stack
        return grad_x.to(ctx.x_dtype), None, None, None


class RowScaledGroupedLinearFunction(Function):
    """``grouped_linear(x, W, offsets)`` for an int8 or fp8 stack through ``row_scaled_grouped_mm``: each weight tile
    dequantised in the kernel's registers, never the whole stack; the backward the same kernel on ``W`` untransposed.
    Saves only ``offsets``."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight, offsets, dtype: torch.dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.save_for_backward(offsets)
        return row_scaled_grouped_mm(x.to(dtype), weight.data, weight.scale.view(torch.float32), offsets,
                                     transpose=True, int8=weight.format == "int8")

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (offsets,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = row_scaled_grouped_mm(grad_output.to(ctx.dtype), weight.data, weight.scale.view(torch.float32),
                                       offsets, transpose=False, int8=weight.format == "int8")
        return grad_x.to(ctx.x_dtype), None, None, None


def row_scaled_kernel_applies(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether ``frozen_grouped_linear`` runs ``row_scaled_grouped_mm``: an int8 or fp8 stack, CUDA kernels allowed,
    a compute dtype the kernel's products take (bf16 or float16)."""
    return weight.format in ("int8", "fp8") and weight.ndim == 3 and use_kernels(x) and \
        compute_dtype(x, weight) in (torch.bfloat16, torch.float16)


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x W^T + b`` for a float or quantised ``weight`` [out, in]; x [..., in] -> [..., out]."""
    if isinstance(weight, QuantizedWeight):
        if fp8_products_apply(x, weight):
            y = Fp8LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, compute_dtype(x, weight))
            return y.view(*x.shape[:-1], -1)
        return DequantLinearFunction.apply(x, weight, bias, compute_dtype(x, weight))
    return F.linear(x, weight, bias)


def frozen_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, offsets: torch.Tensor
) -> torch.Tensor:
    """Per expert ``x_e W_e^T`` for a float or quantised stack [E, out, in]; x [N, in] sorted by expert -> [N, out]."""
    if isinstance(weight, QuantizedWeight):
        function = RowScaledGroupedLinearFunction if row_scaled_kernel_applies(x, weight) else \
            DequantGroupedLinearFunction
        return function.apply(x, weight, offsets, compute_dtype(x, weight))
    return grouped_linear(x, weight, offsets)
