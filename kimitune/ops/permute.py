"""Moving token rows to the experts and back, with gathers in both directions.

    dispatch_rows(x [N, C], order [N * k], inverse [N * k], k) -> [N * k, C]   row i is x[order[i] // k]
    combine_rows(rows [N * k, C], order, inverse, k)           -> [N, C]       row n sums token n's k copies
    permute_rows(x [M, C], perm [M], inverse [M])              -> [M, C]       row i is x[perm[i]]

``order`` sorts a MoE layer's N * k token copies (copy c = token c // k's j-th expert, j = c % k) by expert, and
``inverse`` is its inverse permutation (``inverse[order[i]] = i``, see ``inverse_permutation``). ``dispatch_rows`` and
``combine_rows`` are each other's backward: a gather of every token's copies one way, the sum of each token's
copies (``kimitune.ops.expert_combine``, float32 sums rounded once) the other.

Written with plain indexing, autograd would send these rows back with ``index_put_(accumulate=True)`` and
``index_copy_``: scatters, whose accumulating form adds with atomics, in an order that changes from run to run. Here
every backward is a gather through a permutation (then, for the dispatch, the sum over each token's k copies), so
gradients are the same on every run and no row is written twice.
"""

from __future__ import annotations

import torch

from kimitune.ops.expert_combine import sum_token_copies


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """perm [M] (a permutation of 0..M-1) -> inverse [M] with inverse[perm[i]] = i."""
    positions = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return torch.empty_like(perm).scatter_(0, perm, positions)


class _DispatchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return sum_token_copies(grad, inverse, ctx.k), None, None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return sum_token_copies(rows, inverse, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order // ctx.k), None, None, None


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def dispatch_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, C] -> [N * k, C], row i = x[order[i] // k] (each token's k copies, in ``order``)."""
    return _DispatchRows.apply(x, order, inverse, k)


def combine_rows(rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """rows [N * k, C] sorted by expert -> [N, C], row n the sum of token n's k copies (the inverse of
    ``dispatch_rows`` up to that sum)."""
    return _CombineRows.apply(rows, order, inverse, k)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x [M, C] -> x[perm] [M, C]; ``inverse`` is ``perm``'s inverse permutation."""
    return _PermuteRows.apply(x, perm, inverse)
