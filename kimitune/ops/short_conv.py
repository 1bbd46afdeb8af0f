"""The KDA layer's short convolution as a training step runs it: causal depthwise conv + SiLU, one Triton kernel
each way.

    conv_silu(x [B, T, D], weight [D, W], cu_seqlens=None, parts=1) -> y [B, T, D] (or ``parts`` tensors of its channels)
        y[t] = silu(sum_i weight[:, i] * x[t - (W-1) + i]), a tap before its sequence's start reading zero

This is ``kimitune.ops.causal_conv1d`` with activation 'silu', no bias and no states (fla's kernels keep every other
case). fla's backward first recomputes the pre-activation with a forward kernel, writes it out and reads it back
beside x and the output gradient. This backward recomputes the pre-activation in registers from x's taps, which
it reads through the cache, so memory sees x and dy read once and dx written once, plus a [tiles, D, W] float32
partial sum of the weight's gradient per tile of rows (summed after; deterministic). Packed or not, one launch
each way. That traffic is why these kernels exist beside fla's: they take less than half of fla's time at the
48B's widths (``benchmarks/short_conv_gpu.py``; the figures in benchmarks/RESULTS.md).

Packed sequences never exchange values: each token's position in its sequence (``pos``, int32) bounds its taps.
Arithmetic is float32, rounded once per output. ``kimitune.ops.conv.causal_conv1d_reference`` is the reference.
"""

from __future__ import annotations


import torch

from kimitune.ops.batch_layout import BatchLayout
from kimitune.ops.conv import sequence_positions
from kimitune.ops.triton_utils import dividing_block, grid, jit_on_first_use

tl = None  # triton.language, bound at the kernels' first launch (triton_utils)

BLOCK_T = 16  # rows per program (and per partial sum of the weight's gradient)
BLOCK_D = 128  # channels per program
NUM_WARPS = 4


def _short_conv_forward_kernel(x_ptr, w_ptr, pos_ptr, y0_ptr, y1_ptr, y2_ptr, N, D, DP, W: tl.constexpr,
                               BT: tl.constexpr, BD: tl.constexpr, PARTS: tl.constexpr):
    """One program per (BT rows, BD channels): y = silu(sum of W taps), taps before the sequence start read zero.
    y's channels go to PARTS (1 or 3) tensors [N, DP]: the program's channels all lie in part
    ``program_id(1) * BD // DP`` (BD divides DP)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    in_rows, in_cols = rows < N, cols < D
    pos = tl.load(pos_ptr + rows, mask=in_rows, other=0)
    pre = tl.zeros([BT, BD], dtype=tl.float32)
    for i in tl.static_range(W):
        back = W - 1 - i
        tap = in_rows & (pos >= back)
        w = tl.load(w_ptr + cols * W + i, mask=in_cols, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + (rows - back).to(tl.int64)[:, None] * D + cols[None, :],
                    mask=tap[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
        pre += x * w[None, :]
    y = (pre * tl.sigmoid(pre)).to(y0_ptr.dtype.element_ty)
    part = tl.program_id(1) * BD // DP
    offsets = rows.to(tl.int64)[:, None] * DP + (cols - part * DP)[None, :]
    mask = in_rows[:, None] & in_cols[None, :]
    if PARTS == 1 or part == 0:
        tl.store(y0_ptr + offsets, y, mask=mask)
    elif part == 1:
        tl.store(y1_ptr + offsets, y, mask=mask)
    else:
        tl.store(y2_ptr + offsets, y, mask=mask)


def _short_conv_backward_kernel(x_ptr, w_ptr, pos_ptr, dy0_ptr, dy1_ptr, dy2_ptr, dx_ptr, dw_ptr, N, D, DP,
                                W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, PARTS: tl.constexpr,
                                WEIGHT_GRAD: tl.constexpr):
    """One program per (BT rows, BD channels). x[t] feeds output t + s through tap W-1-s, for s < W within its
    sequence: dx[t] = sum_s w[W-1-s] * g[t+s] with g = dy * silu'(pre), the pre-activations recomputed from x's
    taps; dy in PARTS tensors [N, DP], as the forward's y. With WEIGHT_GRAD, dw_ptr[tile, d, i] = sum over the
    tile's outputs t of g[t] * x[t - (W-1-i)]."""
    tile = tl.program_id(0)
    rows = tile * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    in_rows, in_cols = rows < N, cols < D
    pos = tl.load(pos_ptr + rows, mask=in_rows, other=0)
    part = tl.program_id(1) * BD // DP
    if PARTS == 1 or part == 0:
        dy_ptr = dy0_ptr
    elif part == 1:
        dy_ptr = dy1_ptr
    else:
        dy_ptr = dy2_ptr
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    for s in tl.static_range(W):
        out = rows + s
        out_pos = tl.load(pos_ptr + out, mask=out < N, other=-1)
        same = in_rows & (out < N) & (out_pos == pos + s)  # output t + s is in t's sequence
        pre = tl.zeros([BT, BD], dtype=tl.float32)
        for i in tl.static_range(W):
            back = W - 1 - i
            w = tl.load(w_ptr + cols * W + i, mask=in_cols, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + (out - back).to(tl.int64)[:, None] * D + cols[None, :],
                        mask=(same & (out_pos >= back))[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
            pre += x * w[None, :]
        dy = tl.load(dy_ptr + out.to(tl.int64)[:, None] * DP + (cols - part * DP)[None, :],
                     mask=same[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
        sig = tl.sigmoid(pre)
        g = dy * sig * (1.0 + pre * (1.0 - sig))
        w_s = tl.load(w_ptr + cols * W + (W - 1 - s), mask=in_cols, other=0.0).to(tl.float32)
        dx += g * w_s[None, :]
        if WEIGHT_GRAD and s == 0:
            for i in tl.static_range(W):
                back = W - 1 - i
                x = tl.load(x_ptr + (rows - back).to(tl.int64)[:, None] * D + cols[None, :],
                            mask=(in_rows & (pos >= back))[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
                tl.store(dw_ptr + tile.to(tl.int64) * D * W + cols * W + i, tl.sum(g * x, axis=0), mask=in_cols)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=in_rows[:, None] & in_cols[None, :])


_forward = jit_on_first_use(_short_conv_forward_kernel)
_backward = jit_on_first_use(_short_conv_backward_kernel)


def _tiling(N: int, D: int, parts: int, block_t: int, block_d: int) -> tuple[int, tuple[int, int]]:
    """(channel block, grid) for both directions: with parts, the block shrinks until it divides a part's channels
    (a program writes, and reads back, one part)."""
    if parts > 1:
        block_d = dividing_block(block_d, D // parts)
    return block_d, grid((N, D), (block_t, block_d))


def conv_silu_forward_triton(x: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, parts: int = 1,
                             block_t: int = BLOCK_T, block_d: int = BLOCK_D,
                             num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, ...]:
    """x [N, D] (rows of every sequence back to back), weight [D, W], pos int32 [N] -> ``parts`` (1 or 3) tensors
    [N, D / parts] of y's channels, in x's dtype."""
    N, D = x.shape
    ys = tuple(x.new_empty(N, D // parts) for _ in range(parts))
    block_d, programs = _tiling(N, D, parts, block_t, block_d)
    if x.numel():
        _forward[programs](x, weight, pos, *(ys * 3)[:3], N, D, D // parts, W=weight.shape[1], BT=block_t,
                           BD=block_d, PARTS=parts, num_warps=num_warps)
    return ys


def conv_silu_backward_triton(x: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor,
                              grad_ys: tuple[torch.Tensor, ...], weight_grad: bool = True, block_t: int = BLOCK_T,
                              block_d: int = BLOCK_D,
                              num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """grad_ys: 1 or 3 contiguous tensors [N, D / parts], as the forward returned y -> (grad x [N, D] in x's dtype,
    grad weight [D, W] in weight's dtype, or None without ``weight_grad``)."""
    N, D = x.shape
    parts = len(grad_ys)
    grad_x = torch.empty_like(x)
    block_d, programs = _tiling(N, D, parts, block_t, block_d)
    # Every tile writes its whole [D, W] slice, so no zero fill; without WEIGHT_GRAD nothing is written.
    partial = torch.empty(programs[0] if weight_grad else 1, *weight.shape, dtype=torch.float32, device=x.device)
    if x.numel():
        _backward[programs](x, weight, pos, *(grad_ys * 3)[:3], grad_x, partial, N, D, D // parts, W=weight.shape[1],
                           BT=block_t, BD=block_d, PARTS=parts, WEIGHT_GRAD=weight_grad, num_warps=num_warps)
    return grad_x, partial.sum(0).to(weight.dtype) if weight_grad else None


class _ConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, weight, pos)
        return conv_silu_forward_triton(x, weight, pos, parts)

    @staticmethod
    def backward(ctx, *grad_ys: torch.Tensor):
        x, weight, pos = ctx.saved_tensors
        grad_x, grad_w = conv_silu_backward_triton(x, weight, pos, tuple(g.contiguous() for g in grad_ys),
                                                   ctx.needs_input_grad[1])
        return grad_x, grad_w, None, None


def conv_silu(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: BatchLayout | torch.Tensor | None = None,
              parts: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """x [B, T, D], weight [D, W], the packed batch's layout (B == 1; or its int32 bounds) or None -> y [B, T, D]; with
    ``parts`` > 1, y's channels as that many contiguous tensors [B, T, D / parts] (KDA's q, k and v, which fla's
    kernels would otherwise copy out of one strided buffer)."""
    B, T, D = x.shape
    if parts not in (1, 3) or D % parts:
        raise ValueError(f"conv_silu: {D} channels do not split into {parts} parts (1 or 3)")
    layout = BatchLayout.of(cu_seqlens, x.device, T)
    # The layout's positions are made once per batch, for every KDA layer; a padded batch's are two small kernels.
    pos = layout.positions if layout is not None else sequence_positions(B, T, None, x.device).to(torch.int32)
    ys = _ConvSilu.apply(x.reshape(B * T, D).contiguous(), weight.contiguous(), pos, parts)
    if parts == 1:
        return ys[0].view(B, T, D)
    return tuple(y.view(B, T, D // parts) for y in ys)
