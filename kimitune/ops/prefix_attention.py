"""Causal attention of a piece's queries over its own keys and every earlier token's, the earlier keys expanded from
their latents one block at a time: what MLA needs in a long row computed in pieces (model/pieces.py).

    prefix_attention(q [B, H, T, Dqk], k [B, H, T, Dqk], v [B, H, T, Dv], blocks, expand, params, scale)
        -> [B, H, T, Dv]

``k`` / ``v``: the piece's own keys and values (query t sees own keys 0 .. t). ``blocks``: the earlier tokens as
a list of (latent [B, S_j, R], shared key [B, S_j, r]), each seen by every query; ``expand(latent, shared)`` gives
their keys [B, H, S_j, Dqk] and values [B, H, S_j, Dv] (MLA's kv_b_proj, adapters included), and ``params`` are the
tensors it reads that need gradients (its adapter's). Expanding all S
earlier tokens at once would hold [B, H, S, Dqk + Dv] and its gradient (43 GiB for the 48B at 1M tokens); here one
block's exists at a time, in the forward and again in the backward.

Each block is one fused attention call that also returns the log-sum-exp of its scores; the blocks' outputs merge by
their log-sum-exps (o = sum_j exp(lse_j - lse) o_j, lse = log sum_j exp(lse_j)). The backward runs the fused
attention's backward per block with the merged output and log-sum-exp, which gives that block's exact share of the
query gradient and its keys' and values' gradients (the method of ring attention); a block's keys and values are
expanded again there, with gradients, and their gradients flow into the latents and ``params``.
The CUDA calls run on cuDNN's fused attention on Hopper (``BACKEND = "auto"``, the default), which takes MLA's
values at their own width (128 beside the keys' 192), and on aten's flash kernels on other GPUs (``"flash"``), with
the values zero-padded to the key width (flash attention takes one head size), as on the CPU (aten's CPU flash
kernels). cuDNN is the faster route on an H100 (benchmarks/prefix_attention_gpu.py; figures in
benchmarks/RESULTS.md); tests/ops/test_prefix_attention.py holds both routes to the float32 reference on a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

Expand = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


BACKEND = "auto"  # the CUDA route: "auto" (cuDNN on Hopper, flash elsewhere), "cudnn" or "flash"


@functools.cache
def _cudnn_is_measured_on(device_index: int) -> bool:
    # measured on Hopper only (sm_90); other GPUs keep the route their tests and figures come from
    return torch.cuda.get_device_capability(device_index)[0] == 9 and torch.backends.cudnn.is_available()


def route(device: torch.device) -> str:
    """The route attention on ``device`` takes: "cudnn" or "flash" (CUDA, as ``BACKEND`` says), or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    if BACKEND == "auto":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "cudnn" if _cudnn_is_measured_on(index) else "flash"
    return BACKEND


def _route(q: torch.Tensor) -> str:
    return route(q.device)


def _forward(q, k, v, causal: bool, scale: float):
    """(out [B, H, T, Dv], lse [B, H, T] float32, what the backward needs of this call). ``v`` is padded to the key
    width by the caller on the flash routes."""
    route = _route(q)
    if route == "cudnn":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        # cuDNN's statistics may carry a trailing unit dimension; the merge works on [B, H, T]
        return out, lse.reshape(q.shape[:3]), (cum_q, cum_k, max_q, max_k, seed, offset, lse.shape)
    if route == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, None


def _backward(grad, q, k, v, out, lse, causal: bool, scale: float, saved):
    """(dq, dk, dv) of one block, given the merged ``out`` and ``lse``."""
    route = _route(q)
    if route == "cudnn":
        cum_q, cum_k, max_q, max_k, seed, offset, lse_shape = saved
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.reshape(lse_shape), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0,
            causal, scale=scale)
    if route == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, causal, scale=scale)


def _padded(v: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(v, (0, width - v.shape[-1])) if v.shape[-1] < width else v


def _value_width(q: torch.Tensor, v: torch.Tensor) -> int:
    """The width values take in the attention calls: their own on cuDNN's route, the keys' on flash's."""
    return v.shape[-1] if _route(q) == "cudnn" else q.shape[-1]


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, expand: Expand, scale: float, num_params: int, *tensors):
        params, flat_blocks = tensors[:num_params], tensors[num_params:]
        width, v_dim = _value_width(q, v), v.shape[-1]
        blocks = list(zip(flat_blocks[0::2], flat_blocks[1::2]))
        out, lse, own_saved = _forward(q, k, _padded(v, width), True, scale)
        merged, merged_lse, saved = out.float(), lse, []
        for latent, shared in blocks:
            block_k, block_v = expand(latent, shared)
            o, block_lse, block_saved = _forward(q, block_k, _padded(block_v, width), False, scale)
            new_lse = torch.logaddexp(merged_lse, block_lse)
            merged = merged * (merged_lse - new_lse).exp().unsqueeze(-1) + \
                o.float() * (block_lse - new_lse).exp().unsqueeze(-1)
            merged_lse = new_lse
            saved.append(block_saved)
        # one layout for the output and its gradient, which cuDNN's backward reads side by side
        out = merged.to(q.dtype, memory_format=torch.contiguous_format)
        ctx.expand, ctx.scale, ctx.v_dim, ctx.own_saved, ctx.block_saved = expand, scale, v_dim, own_saved, saved
        ctx.num_params = num_params
        ctx.save_for_backward(q, k, v, out, merged_lse, *params, *flat_blocks)
        return out[..., :v_dim]

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        params, flat_blocks = tensors[:ctx.num_params], tensors[ctx.num_params:]
        param_grads = [None] * len(params)
        width = _value_width(q, v)
        grad = _padded(grad_out.contiguous(), width)
        dq, dk, dv = _backward(grad, q, k, _padded(v, width), out, lse, True, ctx.scale, ctx.own_saved)
        dq = dq.float()
        block_grads = []
        for (latent, shared), saved in zip(zip(flat_blocks[0::2], flat_blocks[1::2]), ctx.block_saved):
            latent, shared = latent.detach().requires_grad_(), shared.detach().requires_grad_()
            with torch.enable_grad():
                block_k, block_v = ctx.expand(latent, shared)
            dq_j, dk_j, dv_j = _backward(grad, q, block_k.detach(), _padded(block_v.detach(), width), out, lse,
                                         False, ctx.scale, saved)
            dq += dq_j.float()
            d_latent, d_shared, *d_params = torch.autograd.grad(
                (block_k, block_v), (latent, shared, *params), (dk_j, dv_j[..., :ctx.v_dim]), allow_unused=True)
            block_grads += [d_latent, d_shared]
            param_grads = [g if total is None else total if g is None else total + g
                           for total, g in zip(param_grads, d_params)]
        return (dq.to(q.dtype), dk, dv[..., :ctx.v_dim], None, None, None, *param_grads, *block_grads)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     blocks: list[tuple[torch.Tensor, torch.Tensor]], expand: Expand, params: list[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """See the module docstring."""
    flat = [t for block in blocks if block[0].shape[1] for t in block]
    return _PrefixAttention.apply(q, k, v, expand, scale, len(params), *params, *flat)


def prefix_attention_reference(q, k, v, blocks, expand, params, scale) -> torch.Tensor:
    """Every block expanded at once and one masked sdpa: the same result with [B, H, S, Dqk + Dv] held."""
    keys, values = zip(*(expand(latent, shared) for latent, shared in blocks)) if blocks else ((), ())
    all_k, all_v = torch.cat([*keys, k], dim=2), torch.cat([*values, v], dim=2)
    T, S = q.shape[2], all_k.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=mask, scale=scale)
