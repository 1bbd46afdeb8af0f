"""Summing each token's k expert rows back into one: the MoE combine, and the dispatch's backward.

    sum_token_copies(rows [N * k, C], inverse [N * k], k) -> y [N, C]
        y[n] = sum_j rows[inverse[n * k + j]]

``rows`` holds a MoE layer's token copies sorted by expert (row i is copy ``order[i]``; copy c = token c // k's j-th
expert, j = c % k) and ``inverse`` is ``order``'s inverse permutation (``kimitune.ops.permute``). The routing
weights are not applied here: the experts scale their activations by them before the down projection
(``kimitune.ops.expert_swiglu``), so the combine is a plain sum. Sums are float32 (float64 for float64 rows),
rounded once to the rows' dtype.

On CUDA one Triton kernel, one program per token and block of columns: it reads the token's k rows where they lie
and writes y. Done with PyTorch ops (:func:`sum_token_copies_reference`: the path off CUDA and under
``kimitune.ops.force_reference``, and the tests' reference) the rows are first gathered into token order, a copy of
all N * k rows, then summed.
"""

from __future__ import annotations

import torch

from kimitune.ops.reference_switch import use_kernels
from kimitune.ops.triton_utils import block_size, cdiv, jit_on_first_use

tl = None  # triton.language, bound at the kernel's first launch (triton_utils)

BLOCK_C = 256  # hidden columns per program; C = 2304 in the released model: 9 blocks
NUM_WARPS = 1


def sum_token_copies_reference(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """PyTorch version of :func:`sum_token_copies` (same arguments and result)."""
    per_token = rows.index_select(0, inverse).view(-1, k, rows.shape[-1])
    return per_token.sum(1, dtype=torch.promote_types(rows.dtype, torch.float32)).to(rows.dtype)


def _sum_copies_kernel(rows_ptr, inv_ptr, y_ptr, C, K: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (token n, BLOCK columns): y[n, cols] = sum_j rows[inv[n * K + j], cols], the copies added one
    row vector at a time (a [K, BLOCK] tile summed over its rows needs a reduction across warps)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_c = cols < C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        src = tl.load(inv_ptr + n * K + j).to(tl.int64)
        acc += tl.load(rows_ptr + src * C + cols, mask=in_c, other=0.0).to(tl.float32)
    tl.store(y_ptr + n * C + cols, acc.to(y_ptr.dtype.element_ty), mask=in_c)


_sum_copies = jit_on_first_use(_sum_copies_kernel)


def sum_token_copies_triton(rows: torch.Tensor, inverse: torch.Tensor, k: int, block: int = BLOCK_C,
                            num_warps: int = NUM_WARPS) -> torch.Tensor:
    """The kernel (CUDA, or CPU under TRITON_INTERPRET=1); arguments and result as :func:`sum_token_copies`."""
    if rows.shape[0] % k:
        raise ValueError(f"sum_token_copies: {rows.shape[0]} rows are not k = {k} copies of each token")
    num_tokens, width = rows.shape[0] // k, rows.shape[1]
    y = rows.new_empty(num_tokens, width)
    if num_tokens:
        block = block_size(width, cap=block)
        _sum_copies[(num_tokens, cdiv(width, block))](rows.contiguous(), inverse, y, width, K=k, BLOCK=block,
                                                      num_warps=num_warps)
    return y


def sum_token_copies(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """rows [N * k, C] sorted by expert, inverse [N * k] -> y [N, C] (see the module docstring); not differentiable
    by itself: ``kimitune.ops.permute`` wraps it."""
    if use_kernels(rows) and rows.dtype != torch.float64:
        return sum_token_copies_triton(rows, inverse, k)
    return sum_token_copies_reference(rows, inverse, k)
