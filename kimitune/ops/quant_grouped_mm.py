"""Grouped expert products with 8-bit frozen weights, dequantised inside the matmul (issue 24).

    row_scaled_grouped_mm(a [N, K], q [E, R, C] int8 | float8_e4m3fn, scale [E, R] float32, offsets [E] int32,
                          transpose: bool, int8: bool) -> [N, C if not transpose else R]

The stored weight of expert ``e`` is ``W_e = q_e * scale_e[:, None]`` (int8: ``scale / 127``, LLM.int8's
convention), R output rows of C inputs. Rows ``offsets[e-1]:offsets[e]`` of ``a`` belong to expert ``e`` and get
``a_rows @ W_e^T`` (``transpose``: the forward ``x W^T``, [N, R]) or ``a_rows @ W_e`` (not ``transpose``: the input
gradient ``dY W``, [N, C]).

Why a kernel: dequantising a whole stack to bf16 before ``torch._grouped_mm`` writes and reads it again (3 bytes an
entry at the least, per pass) and, for the 48B's 256 experts at 8192 tokens, costs as much as the product itself
(benchmarks/fp8_grouped.py); ``torch._scaled_grouped_mm`` multiplies e4m3 by e4m3 at about bf16's speed in the
forward once the activations are scaled, but its backward needs the stack transposed and the scales gathered per
expert, about ten times bf16's time in eager torch (RESULTS.md, 2026-12-04). This kernel reads each weight tile's
bytes once per row tile, scales them in registers in float32 and rounds to the activations' dtype, exactly the
values ``kimitune.quant.formats`` dequantises to, then multiplies in that dtype with float32 accumulation: the
product of the dequantising reference, without the dequantised stack.

With ``fp8_products`` (e4m3 stacks) the kernel multiplies e4m3 by e4m3 instead, at Hopper's FP8 rate: each row
tile's activations are scaled to e4m3 per row and ``ACTIVATION_BLOCK`` contracted columns in registers (the input
gradient's multiplied by the contracted rows' scales first, which makes the row-scaled backward exact), each block's
float32 product times its scales is added up, and the forward's output is multiplied by the rows' scales. Not
used in training until measured faster (benchmarks/fp8_grouped.py's ``kimitune fp8 products``).

Row tiles: expert ``e`` has ``ceil(n_e / BLOCK_M)`` of them; the launch covers ``ceil(N / BLOCK_M) + E`` (enough
for every split, known without reading ``offsets`` on the host) and each program finds its expert from the
cumulative tile counts; programs past the last tile return at once.
"""

from __future__ import annotations

import functools
import os

import torch

from kimitune.ops.triton_utils import cdiv, import_triton, next_power_of_2

tl = None  # triton.language, bound when the kernel is first made (triton_utils)

CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), autotuned per shape; few, since each new process
    # tunes every shape again in its first step
    (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
]
ACTIVATION_BLOCK = 128  # FP8 products: one activation scale per row and this many contracted columns
FP8_CONFIGS = [(m, n, ACTIVATION_BLOCK, w, s) for m, n, _, w, s in CONFIGS]


def _row_scaled_grouped_mm(a_ptr, q_ptr, s_ptr, tile_ends_ptr, offsets_ptr, y_ptr, N_OUT, K,
                           stride_qe, stride_qk, stride_qn, stride_se,
                           E: tl.constexpr, E_BLOCK: tl.constexpr, SCALE_ON_K: tl.constexpr,
                           INT8: tl.constexpr, FP8_PRODUCTS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, E_BLOCK)
    ends = tl.load(tile_ends_ptr + experts, mask=experts < E, other=2147483647)
    e = tl.sum((ends <= pid_m).to(tl.int32), axis=0)  # this program's expert: tiles before it end at or below pid_m
    if e >= E:
        return
    tiles_before = tl.load(tile_ends_ptr + e - 1, mask=e > 0, other=0)
    row_start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0) + (pid_m - tiles_before) * BLOCK_M
    row_end = tl.load(offsets_ptr + e)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N_OUT
    q_base = q_ptr + e.to(tl.int64) * stride_qe
    s_base = s_ptr + e.to(tl.int64) * stride_se
    if not SCALE_ON_K:  # the forward: the scale belongs to an output column
        col_scale = tl.load(s_base + cols, mask=col_ok, other=0.0)
        if INT8:
            col_scale = col_scale / 127.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        q = tl.load(q_base + ks[:, None] * stride_qk + cols[None, :] * stride_qn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0)
        if FP8_PRODUCTS:  # e4m3 by e4m3; the tile's activations scaled per row (and by W's rows when contracted)
            a_f = a.to(tl.float32)
            if SCALE_ON_K:
                a_f = a_f * tl.load(s_base + ks, mask=k_ok, other=0.0)[None, :]
            a_scale = tl.maximum(tl.max(tl.abs(a_f), axis=1), 1e-30) / 448.0  # e4m3's largest
            a_q = (a_f / a_scale[:, None]).to(tl.float8e4nv)
            acc += tl.dot(a_q, q.to(tl.float8e4nv, bitcast=True)) * a_scale[:, None]
        else:
            if INT8:
                w = q.to(tl.float32)
            else:
                w = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            if SCALE_ON_K:  # the input gradient: the scale belongs to a contracted row of W
                k_scale = tl.load(s_base + ks, mask=k_ok, other=0.0)
                if INT8:
                    k_scale = k_scale / 127.0
                w = w * k_scale[:, None]
            else:
                w = w * col_scale[None, :]
            acc = tl.dot(a, w.to(a.dtype), acc)
    if FP8_PRODUCTS and not SCALE_ON_K:
        acc = acc * col_scale[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * N_OUT + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@functools.cache
def _kernel(fp8_products: bool) -> tuple[object, dict]:
    """(the kernel, the launch's block arguments), made on first use (triton is imported then: CPU installs never
    need it). On a GPU it is autotuned over ``CONFIGS`` per shape (``FP8_CONFIGS`` for FP8 products, whose K tile
    is the activations' scaling block); Triton's interpreter, which cannot time kernels, runs the first config."""
    triton, language = import_triton()
    _row_scaled_grouped_mm.__globals__["tl"] = language
    jitted = triton.jit(_row_scaled_grouped_mm)
    candidates = FP8_CONFIGS if fp8_products else CONFIGS
    if os.environ.get("TRITON_INTERPRET") == "1":
        m, n, k, _, _ = candidates[0]
        return jitted, {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
               for m, n, k, w, s in candidates]
    return triton.autotune(configs, key=["N_OUT", "K", "E", "SCALE_ON_K"])(jitted), {}


def row_scaled_grouped_mm_reference(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
                                    transpose: bool, int8: bool) -> torch.Tensor:
    """The reference: the stack dequantised (float32 product, rounded once to ``a``'s dtype), then one matmul per
    expert (reads ``offsets`` on the host)."""
    values = q.float() if int8 else q.view(torch.float8_e4m3fn).float()
    w = (values * (scale / 127.0 if int8 else scale).unsqueeze(-1)).to(a.dtype)
    ends = offsets.tolist()
    parts = [a[s:e] @ (w[i].T if transpose else w[i]) for i, (s, e) in enumerate(zip([0] + ends[:-1], ends))]
    width = q.shape[1] if transpose else q.shape[2]
    return torch.cat(parts) if parts else a.new_zeros(0, width)


def row_scaled_grouped_mm_fp8_reference(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                                        offsets: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The reference of the FP8 products (an e4m3 stack): per expert, the activations (the input gradient's
    multiplied by the contracted rows' scales first) scaled to e4m3 per row and ``ACTIVATION_BLOCK`` contracted
    columns, each block's product with the e4m3 values in float32 times its scales, summed; the forward's output
    times the rows' scales. Float32 result (reads ``offsets`` on the host)."""
    values = q.view(torch.float8_e4m3fn).float()
    ends, parts = offsets.tolist(), []
    for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
        x = a[start:end].float() * (1.0 if transpose else scale[e])
        w = values[e].T if transpose else values[e]  # [K, N_OUT]
        out = x.new_zeros(x.shape[0], w.shape[1])
        for k0 in range(0, x.shape[1], ACTIVATION_BLOCK):
            block = x[:, k0:k0 + ACTIVATION_BLOCK]
            block_scale = block.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 448.0
            coded = (block / block_scale).to(torch.float8_e4m3fn).float()
            out += (coded @ w[k0:k0 + ACTIVATION_BLOCK]) * block_scale
        parts.append(out * scale[e] if transpose else out)
    width = q.shape[1] if transpose else q.shape[2]
    return torch.cat(parts) if parts else a.new_zeros(0, width, dtype=torch.float32)


def row_scaled_grouped_mm(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
                          transpose: bool, int8: bool, fp8_products: bool = False) -> torch.Tensor:
    """The module docstring's product through the Triton kernel (CUDA tensors, or CPU ones under Triton's
    interpreter). ``q`` is int8 (``int8``) or the e4m3 bits as uint8 / float8_e4m3fn. ``fp8_products`` (e4m3 stacks
    only): the products e4m3 by e4m3, the activations scaled per row and ``ACTIVATION_BLOCK`` contracted columns in
    registers (:func:`row_scaled_grouped_mm_fp8_reference`) instead of the weights dequantised to ``a``'s dtype."""
    if fp8_products and int8:
        raise ValueError("row_scaled_grouped_mm: fp8_products multiplies e4m3 stacks, not int8 ones")
    experts, rows_w, cols_w = q.shape
    if a.dim() != 2 or a.shape[1] != (cols_w if transpose else rows_w) or scale.shape != (experts, rows_w):
        raise ValueError(f"row_scaled_grouped_mm: a {tuple(a.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)} "
                         f"do not fit (transpose={transpose})")
    a = a.contiguous()
    q = q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q
    n_out, k = (rows_w, cols_w) if transpose else (cols_w, rows_w)
    # W_e viewed as the [K, N_OUT] matrix b of a @ b: its strides along K and along N_OUT
    stride_k, stride_n = (q.stride(2), q.stride(1)) if transpose else (q.stride(1), q.stride(2))
    y = torch.empty(a.shape[0], n_out, dtype=a.dtype, device=a.device)
    offsets = offsets.to(torch.int32)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    kernel, blocks = _kernel(fp8_products)

    def grid(meta):  # the row tiles depend on the config's BLOCK_M: counted for each launch the autotuner makes
        tile_ends.copy_(torch.cumsum((counts + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], 0))
        return cdiv(a.shape[0], meta["BLOCK_M"]) + experts, cdiv(n_out, meta["BLOCK_N"])

    tile_ends = torch.empty(experts, dtype=torch.int32, device=a.device)
    kernel[grid](a, q, scale.contiguous(), tile_ends, offsets, y, n_out, k, q.stride(0), stride_k, stride_n,
                 scale.stride(0), E=experts, E_BLOCK=next_power_of_2(experts), SCALE_ON_K=not transpose, INT8=int8,
                 FP8_PRODUCTS=fp8_products, **blocks)
    return y

