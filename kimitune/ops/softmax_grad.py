"""Cross-entropy statistics of a chunk of logits, and its gradient written over the chunk in place.

    softmax_grad_(logits [R, V], targets [R], valid [R] | None, scale, write_grad)
        -> lse [R] float32, target_logit [R] float32
        and, when ``write_grad``, logits[r] := (softmax(logits[r]) - onehot(targets[r])) * valid[r] * scale

This is the elementwise half of kimitune.ops.loss's fused linear cross-entropy: the caller computes a chunk of
logits with one GEMM, and the gradient of sum(lse - target_logit) with respect to it replaces it, ready for the
next GEMM (grad_logits @ weight). Statistics are float32 whatever the logits' dtype (transformers upcasts logits to
float32 before the softmax); the gradient is rounded once, to the logits' dtype.

For CUDA tensors a Triton kernel does it in one launch (triton is imported at its first launch, so CPU-only installs
import this module without it): one program per row, a first pass over V with an online max and sum, then a pass
that writes the gradient, so the [R, V] chunk is read twice and written once. Done with PyTorch ops the same takes
about eight passes over the chunk and float32 temporaries of its size; :func:`softmax_grad_reference_` is that
version: the path off CUDA and under ``kimitune.ops.force_reference``, and the tests' reference.

``targets`` must lie in [0, V) on every row, ignored rows included (give those any index, e.g. 0, and valid False).
"""

from __future__ import annotations

import torch

from kimitune.ops.reference_switch import use_kernels
from kimitune.ops.triton_utils import block_size, jit_on_first_use

tl = None  # triton.language, bound at the kernel's first launch (triton_utils)

BLOCK_V = 4096  # columns per step of a row's loop; V = 163840 in the released model, so 40 steps per pass
NUM_WARPS = 8


def softmax_grad_reference_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    scale: float = 1.0,
    write_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of :func:`softmax_grad_` (same arguments and results), in float32 temporaries of [R, V]."""
    x = logits.float()
    target_logit = x.gather(1, targets[:, None].long()).squeeze(1)
    if not write_grad:
        return torch.logsumexp(x, dim=-1), target_logit
    # In place on x from here (a float32 copy, or the logits themselves when float32): exp(x - max) is the
    # softmax's numerator, and one per-row factor turns it into the scaled gradient.
    row_max = x.amax(dim=-1, keepdim=True)
    x.sub_(row_max).exp_()
    row_sum = x.sum(dim=-1, keepdim=True)
    lse = (row_max + row_sum.log()).squeeze(1)
    row_scale = scale / row_sum if valid is None else valid[:, None] * scale / row_sum
    x.mul_(row_scale)
    x.scatter_add_(1, targets[:, None].long(), -row_scale * row_sum)  # minus the one-hot, scaled as its row
    if x is not logits:
        logits.copy_(x)
    return lse, target_logit


def _softmax_grad_kernel(logits_ptr, row_stride, targets_ptr, valid_ptr, lse_ptr, target_logit_ptr, scale,
                         V: tl.constexpr, HAS_VALID: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of the chunk (jitted at its first launch, ``_softmax_grad``). V is a compile-time
    constant, so one compilation per vocabulary: Triton 3.6's interpreter cannot loop to a runtime bound under
    NumPy 2.4 (its scalar arguments are 1-element arrays), and a model has one vocabulary anyway."""
    row = tl.program_id(0).to(tl.int64)  # row * row_stride passes 2**31 for chunks of a large vocabulary
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)

    # Pass 1: running max m and sum s of exp(x - m) over the row, rescaled when the max grows.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    target_logit = tl.load(row_ptr + target).to(tl.float32)  # read before pass 2 overwrites the row
    tl.store(lse_ptr + row, lse)
    tl.store(target_logit_ptr + row, target_logit)

    if WRITE_GRAD:
        row_scale = scale
        if HAS_VALID:
            row_scale = tl.where(tl.load(valid_ptr + row) != 0, scale, 0.0)
        # Pass 2: the row's gradient over its own logits (each block is read before it is written).
        for start in range(0, V, BLOCK):
            in_row = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=in_row, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(start + cols == target, p - 1.0, p) * row_scale
            tl.store(row_ptr + start + cols, p.to(logits_ptr.dtype.element_ty), mask=in_row)


_softmax_grad = jit_on_first_use(_softmax_grad_kernel)


def softmax_grad_triton_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    scale: float = 1.0,
    write_grad: bool = True,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`softmax_grad_` (``block_v`` / ``num_warps`` default to the module's constants).

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"softmax_grad_: logits must have contiguous rows, got strides {logits.stride()}")
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return lse, target_logit
    # A bool tensor's bytes, as uint8: loads of i1 pointers are less portable across Triton versions.
    valid_bytes = targets if valid is None else valid.view(torch.uint8)
    block = block_size(vocab, cap=block_v or BLOCK_V)
    _softmax_grad[(rows,)](
        logits, logits.stride(0), targets, valid_bytes, lse, target_logit, float(scale), vocab,
        HAS_VALID=valid is not None, WRITE_GRAD=write_grad, BLOCK=block, num_warps=num_warps or NUM_WARPS,
    )
    return lse, target_logit


def softmax_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    scale: float = 1.0,
    write_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (rows contiguous), targets [R] in [0, V), valid [R] bool or None (all rows) ->
    (lse [R], target_logit [R]), both float32. With ``write_grad`` the logits are overwritten with
    (softmax - onehot(target)) * valid * scale in their own dtype; without, they are left as they are."""
    fn = softmax_grad_triton_ if use_kernels(logits) else softmax_grad_reference_
    return fn(logits, targets, valid, scale, write_grad)
