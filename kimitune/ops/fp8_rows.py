"""Activations scaled to float8 e4m3 row by row, in one kernel (issue 24: the FP8 products' inputs).

    quantize_rows_e4m3(x [N, K], column_scale [K] float32 | None, e4m3_max) -> (q float8_e4m3fn [N, K],
                                                                                 scale float32 [N, 1])

Row ``r`` of ``y = x * column_scale`` (computed in float32; no ``column_scale``: ``y = x``) gets
``scale[r] = max_j |y[r, j]| / e4m3_max`` (1 for a row of zeros) and ``q[r] = e4m3(clamp(y[r] / scale[r]))``: the
numbers ``kimitune.quant.formats.quantize_rows_fp8`` gives, which is the reference. In eager torch that is five
passes over the activations with float32 temporaries (cast, abs, max, divide, cast); this is one read for the
maximum and one for the store. ``column_scale`` is how the input gradient of a row-scaled weight stays exact
(``dY diag(s)``, kimitune/quant/matmul.py).
"""

from __future__ import annotations

import torch

from kimitune.ops.triton_utils import block_size, jit_on_first_use

tl = None  # triton.language, bound at the first launch (triton_utils)


def _quantize_rows_kernel(x_ptr, c_ptr, q_ptr, s_ptr, K, E4M3_MAX, HAS_COLUMN_SCALE: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        y = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_COLUMN_SCALE:
            y = y * tl.load(c_ptr + cols, mask=cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.max(amax, axis=0) / E4M3_MAX
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        y = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_COLUMN_SCALE:
            y = y * tl.load(c_ptr + cols, mask=cols < K, other=0.0)
        q = tl.minimum(tl.maximum(y / scale, -E4M3_MAX), E4M3_MAX)
        tl.store(q_ptr + row * K + cols, q.to(tl.float8e4nv), mask=cols < K)


quantize_rows_kernel = jit_on_first_use(_quantize_rows_kernel)


def quantize_rows_e4m3(x: torch.Tensor, column_scale: torch.Tensor | None, e4m3_max: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The module docstring's quantisation through the Triton kernel (CUDA tensors, or CPU ones under Triton's
    interpreter)."""
    if x.dim() != 2 or (column_scale is not None and column_scale.shape != (x.shape[1],)):
        raise ValueError(f"quantize_rows_e4m3: x {tuple(x.shape)} must be [N, K] and column_scale [K], got "
                         f"{None if column_scale is None else tuple(column_scale.shape)}")
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    column = x if column_scale is None else column_scale.float().contiguous()  # any pointer when unused
    quantize_rows_kernel[(x.shape[0],)](x, column, q, scale, x.shape[1], e4m3_max,
                                        HAS_COLUMN_SCALE=column_scale is not None,
                                        BLOCK=block_size(x.shape[1], 2048, floor=128))
    return q, scale
