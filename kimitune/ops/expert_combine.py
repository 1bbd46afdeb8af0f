"""The MoE combine: each token's k expert outputs, weighted and summed.

    combine_experts(expert_out [N * k, C], weights [N, k], order [N * k], inverse [N * k]) -> y [N, C]
        y[n] = sum_j weights[n, j] * expert_out[inverse[n * k + j]]

``expert_out`` holds the token copies sorted by expert (row i is copy ``order[i]``; copy c = token c // k's j-th
expert, j = c % k) and ``inverse`` is ``order``'s inverse permutation (``kimitune.ops.permute``). ``weights`` are
in ``expert_out``'s dtype; sums are float32, rounded once.

On CUDA one Triton kernel per direction, one program per token: the forward reads the token's k rows where they lie
and writes y; the backward writes the k rows' gradients (weights[n, j] * grad_y[n]) and the weights' gradients
(dot products with grad_y[n]). Done with PyTorch ops (``combine_experts_reference``, used elsewhere and as the
reference in the tests) the rows are first gathered into token order ([N, k, C], ``permute_rows``) and summed by a
batched [1, k] x [k, C] matmul, which passes over that copy twice more in the backward.
"""

from __future__ import annotations

import functools

import torch

from kimitune.ops.permute import permute_rows

tl = None  # triton.language, imported by _kernels() on first use

BLOCK_C = 512  # hidden columns per step of a token's loop; C = 2304 in the released model
NUM_WARPS = 4


def combine_experts_reference(expert_out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                              inverse: torch.Tensor) -> torch.Tensor:
    """PyTorch version of :func:`combine_experts` (same arguments and result), differentiable by autograd."""
    per_copy = permute_rows(expert_out, inverse, order).view(weights.shape[0], weights.shape[1], -1)
    return torch.bmm(weights.unsqueeze(1), per_copy).squeeze(1)


def _combine_forward_kernel(out_ptr, w_ptr, inv_ptr, y_ptr, C: tl.constexpr, K: tl.constexpr,
                            K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per token n: y[n] = sum_j w[n, j] * out[inv[n * K + j]]. ``C`` is a compile-time constant (one
    compilation per hidden size), as Triton 3.6's interpreter cannot loop to a runtime bound under NumPy 2.4."""
    n = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, K_PAD)
    in_k = js < K
    rows = tl.load(inv_ptr + n * K + js, mask=in_k, other=0).to(tl.int64)
    w = tl.load(w_ptr + n * K + js, mask=in_k, other=0.0).to(tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_c = cols < C
        x = tl.load(out_ptr + rows[:, None] * C + cols[None, :], mask=in_k[:, None] & in_c[None, :],
                    other=0.0).to(tl.float32)
        y = tl.sum(x * w[:, None], axis=0)
        tl.store(y_ptr + n * C + cols, y.to(y_ptr.dtype.element_ty), mask=in_c)


def _combine_backward_kernel(out_ptr, w_ptr, inv_ptr, grad_y_ptr, grad_out_ptr, grad_w_ptr, C: tl.constexpr,
                             K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per token n: grad_out[inv[n * K + j]] = w[n, j] * grad_y[n] and grad_w[n, j] = <out[inv[...]],
    grad_y[n]> (float32)."""
    n = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, K_PAD)
    in_k = js < K
    rows = tl.load(inv_ptr + n * K + js, mask=in_k, other=0).to(tl.int64)
    w = tl.load(w_ptr + n * K + js, mask=in_k, other=0.0).to(tl.float32)
    dots = tl.zeros([K_PAD], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_c = cols < C
        both = in_k[:, None] & in_c[None, :]
        g = tl.load(grad_y_ptr + n * C + cols, mask=in_c, other=0.0).to(tl.float32)
        x = tl.load(out_ptr + rows[:, None] * C + cols[None, :], mask=both, other=0.0).to(tl.float32)
        dots += tl.sum(x * g[None, :], axis=1)
        tl.store(grad_out_ptr + rows[:, None] * C + cols[None, :],
                 (w[:, None] * g[None, :]).to(grad_out_ptr.dtype.element_ty), mask=both)
    tl.store(grad_w_ptr + n * K + js, dots, mask=in_k)


@functools.cache
def _kernels():
    """The jitted kernels, built on first use (triton imported here only; TRITON_INTERPRET=1 must be set before that
    import for the interpreter to run them)."""
    global tl  # a module global: Triton's compiler and interpreter resolve `tl` in the kernels' globals
    import triton
    import triton.language as tl

    return triton.jit(_combine_forward_kernel), triton.jit(_combine_backward_kernel)


def _sizes(expert_out: torch.Tensor, weights: torch.Tensor) -> dict:
    num_tokens, k = weights.shape
    if expert_out.shape[0] != num_tokens * k:
        raise ValueError(f"combine_experts: expert_out has {expert_out.shape[0]} rows, weights {tuple(weights.shape)} "
                         f"need {num_tokens * k}")
    return {"C": expert_out.shape[1], "K": k, "K_PAD": 1 << max(0, (k - 1).bit_length()),
            "BLOCK": min(BLOCK_C, 1 << max(4, (expert_out.shape[1] - 1).bit_length()))}


def combine_forward_triton(expert_out: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The forward kernel: expert_out [N * k, C], weights [N, k], inverse [N * k] -> y [N, C] (CUDA, or CPU under
    TRITON_INTERPRET=1)."""
    sizes = _sizes(expert_out, weights)
    y = expert_out.new_empty(weights.shape[0], sizes["C"])
    if weights.shape[0]:
        _kernels()[0][(weights.shape[0],)](expert_out.contiguous(), weights.contiguous(), inverse, y, **sizes,
                                           num_warps=NUM_WARPS)
    return y


def combine_backward_triton(expert_out: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor,
                            grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel: -> (grad expert_out [N * k, C] in its dtype, grad weights [N, k] float32)."""
    sizes = _sizes(expert_out, weights)
    grad_out = torch.empty_like(expert_out)
    grad_w = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
    if weights.shape[0]:
        _kernels()[1][(weights.shape[0],)](expert_out.contiguous(), weights.contiguous(), inverse,
                                           grad_y.contiguous(), grad_out, grad_w, **sizes, num_warps=NUM_WARPS)
    return grad_out, grad_w


class _CombineExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(expert_out, weights, inverse)
        return combine_forward_triton(expert_out, weights, inverse)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        expert_out, weights, inverse = ctx.saved_tensors
        grad_out, grad_w = combine_backward_triton(expert_out, weights, inverse, grad_y)
        return grad_out, grad_w.to(weights.dtype), None


def combine_experts(expert_out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                    inverse: torch.Tensor) -> torch.Tensor:
    """expert_out [N * k, C] sorted by expert, weights [N, k] (expert_out's dtype), order / inverse [N * k] ->
    y [N, C] (see the module docstring)."""
    if expert_out.is_cuda:
        return _CombineExperts.apply(expert_out, weights, inverse)
    return combine_experts_reference(expert_out, weights, order, inverse)
