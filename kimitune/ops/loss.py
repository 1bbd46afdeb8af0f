"""Cross-entropy of a linear head, ``CE(hidden @ weight.T, targets)``, without materialising [N, V] logits.

Two implementations, chosen by ``linear_cross_entropy(..., impl=)``:

- "fused" (any device): a chunked autograd function that computes the gradient already in the forward. For each
  chunk of rows it computes the logits with one GEMM, overwrites them in place with their gradient
  (kimitune.ops.softmax_grad: one Triton kernel on CUDA, PyTorch ops elsewhere) and multiplies that by the weight
  (and, for a trained head, by the hidden states): two GEMMs per chunk where recomputing the logits in the backward
  takes three. It keeps the gradients, not the inputs, for the backward, which only scales them. Without a
  gradient to compute (eval, ``torch.no_grad``) it is one GEMM per chunk and keeps nothing. Memory holds one
  [chunk_rows, V] chunk of logits at a time (``_CHUNK_BYTES``).
  The default, because on Kimi's head it is faster than both cut-cross-entropy and full logits, forward + backward
  (``benchmarks/loss_gpu.py``; the figures in benchmarks/RESULTS.md).
- "cce": the ``cut-cross-entropy`` package's kernels (CUDA only; imported lazily, here only), which recompute the
  logits in the backward; kept to measure against. Under ``kimitune.ops.force_reference`` it runs "fused", whose
  softmax gradient then takes its PyTorch reference: no kernel of either.

Logits follow transformers' precision: the matmul runs in the inputs' dtype and is upcast to float32 before the
softmax. Targets equal to -100 are ignored; ``reduction="mean"`` divides by the number of the others, "none" returns
each row's loss (0 on ignored rows).
"""

from __future__ import annotations

import functools

import torch

from kimitune.ops.reference_switch import reference_forced
from kimitune.ops.softmax_grad import softmax_grad_

IGNORE_INDEX = -100
# One chunk of logits in the compute dtype (the CPU path adds float32 temporaries of its size): 1024 rows of bf16 at
# V = 163840, so that grad_logits @ weight, whose output is only [rows, H], still has enough tiles for every SM
# (1024 rows measured faster than 768: benchmarks/RESULTS.md). It is freed before the backward, whose buffers
# kimitune.plan counts at the peak instead.
_CHUNK_BYTES = 320 * 2**20
_ROW_ALIGN = 64  # chunk rows rounded down to a multiple of this: a GEMM's M dimension in whole tiles
IMPLS = ("fused", "cce")
REDUCTIONS = ("mean", "sum", "none")  # "none": each row's loss, float32 [N], 0 on ignored rows


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """autocast's dtype inside an autocast region (as the lm_head Linear would use), else the promoted dtype."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows of logits per chunk: ``_CHUNK_BYTES`` of [rows, vocab] in ``dtype``, in whole GEMM tiles when that is
    at least one tile."""
    rows = max(1, _CHUNK_BYTES // (dtype.itemsize * vocab))
    return rows - rows % _ROW_ALIGN if rows >= _ROW_ALIGN else rows


@functools.cache
def _addmm_into_float32_works(device: torch.device) -> bool:
    """Whether this PyTorch's CUDA addmm adds a bf16 product straight into a float32 tensor (``out_dtype``).

    Probed once per device on a 2x2 product, because the dtypes ``out_dtype`` accepts for the added tensor have
    changed between PyTorch releases."""
    acc = torch.ones(2, 2, device=device)
    ones = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool((acc == 3).all())


def _add_product_float32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [M, P] float32 += a [M, K] @ b [K, P], a and b in the compute dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda and _addmm_into_float32_works(acc.device):
        # cuBLAS accumulates in float32 and adds into acc: no [M, P] temporary in the compute dtype.
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b


class LossRows:
    """The rows of ``targets`` [N] that carry a loss (target != -100), found on the host without draining the GPU.

    The fused loss computes only these rows, so ignored ones (prompts, padding) cost no GEMM; but their number
    must be known on the host. ``nonzero`` on the device would make the host wait, at the loss, for the whole
    forward the GPU has queued, after which the GPU idles while the host launches the backward's first kernels.
    Built before the forward's layers (``KimiLinearForCausalLM.forward`` does), this instead copies the mask to
    pinned host memory behind an event; ``indices()`` then waits only for that copy, which the GPU reached at the
    start of the forward. On the CPU it is ``nonzero`` directly.
    """

    def __init__(self, targets: torch.Tensor):
        self.device = targets.device
        mask = targets != IGNORE_INDEX
        self._event = None
        self._indices: torch.Tensor | None = None
        if targets.is_cuda:
            self._mask = torch.empty(mask.shape, dtype=torch.bool, pin_memory=True)
            self._mask.copy_(mask, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._mask = mask

    def indices(self) -> torch.Tensor:
        """[n] int64 on the targets' device: the rows with a target, in order."""
        if self._indices is None:
            if self._event is not None:
                self._event.synchronize()
            rows = self._mask.nonzero().squeeze(1)
            self._indices = rows.pin_memory().to(self.device, non_blocking=True) if self._event is not None else rows
        return self._indices


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, chunk_rows: int,
            write_grad: bool):
    """Yields, for each chunk of the non-ignored ``rows``: (the chunk's row indices [n], their hidden states [n, H],
    their logits [n, V] (overwritten with the token losses' gradient when ``write_grad``), their token losses
    float32 [n]). One logits buffer serves every chunk: use each before asking for the next."""
    buffer = hidden.new_empty(min(chunk_rows, rows.numel()), weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are already the compute dtype's
        for chunk in rows.split(chunk_rows):
            h = hidden.index_select(0, chunk)
            logits = torch.mm(h, weight.T, out=buffer[: chunk.numel()])
            lse, target_logit = softmax_grad_(logits, targets.index_select(0, chunk), write_grad=write_grad)
            yield chunk, h, logits, lse - target_logit


def _fused_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int,
    need_hidden: bool,
    need_weight: bool,
    loss_rows: LossRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden [N, H], weight [V, H], targets [N] -> (sum of -log softmax(hidden @ weight.T)[target] over the
    non-ignored rows, float32 scalar; its gradient for hidden [N, H] and for weight [V, H] in their dtypes, or None
    where not asked for).

    Only the non-ignored rows are computed (``LossRows``; made here when not given, which waits for the GPU)."""
    rows = (loss_rows or LossRows(targets)).indices()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    for chunk, h, logits, losses in _chunks(hidden, weight, targets, rows, chunk_rows, need_hidden or need_weight):
        total += losses.sum()
        if need_hidden:
            grad_hidden.index_copy_(0, chunk, logits @ weight)
        if need_weight:
            _add_product_float32_(grad_weight, logits.T, h)
    if need_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return total, grad_hidden, grad_weight


class _FusedLinearCrossEntropySum(torch.autograd.Function):
    """Sum over the non-ignored rows of -log softmax(hidden @ weight.T)[target], as a float32 scalar; its gradients
    are computed in the forward and kept for the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                loss_rows: LossRows | None):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, grad_hidden, grad_weight = _fused_sum(hidden, weight, targets, chunk_rows, need_hidden, need_weight,
                                                     loss_rows)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Out of place, so that a second backward (retain_graph) scales the saved gradients again from scratch.
        # Stays in the gradients' dtype: at worst the scale is rounded to it, one relative error on the whole step.
        scaled = [None if g is None else g * grad_total for g in (grad_hidden, grad_weight)]
        return scaled[0], scaled[1], None, None, None


def _fused_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, need_hidden: bool,
                loss_rows: LossRows | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """hidden [N, H], weight [V, H], targets [N] -> (each row's -log softmax(hidden @ weight.T)[target], float32 [N]
    with 0 on ignored rows; each row's own gradient for hidden [N, H] or None; the non-ignored rows [n])."""
    rows = (loss_rows or LossRows(targets)).indices()
    token_losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    for chunk, _, logits, losses in _chunks(hidden, weight, targets, rows, chunk_rows, need_hidden):
        token_losses.index_copy_(0, chunk, losses)
        if need_hidden:
            grad_hidden.index_copy_(0, chunk, logits @ weight)
    return token_losses, grad_hidden, rows


class _FusedLinearCrossEntropyRows(torch.autograd.Function):
    """Each row's -log softmax(hidden @ weight.T)[target], float32 [N] (0 on ignored rows).

    Every row's loss has its own weight in what follows (a preference loss sums them per sequence), so the
    hidden states' gradient is kept per row from the forward and scaled row by row in the backward; the weight's
    gradient, a sum over rows with those weights, is recomputed in the backward when the head is trained."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                loss_rows: LossRows | None):
        need_weight = ctx.needs_input_grad[1]
        token_losses, grad_hidden, rows = _fused_rows(hidden, weight, targets, chunk_rows, ctx.needs_input_grad[0],
                                                      loss_rows)
        ctx.chunk_rows = chunk_rows
        ctx.save_for_backward(grad_hidden, hidden if need_weight else None, weight if need_weight else None,
                              targets, rows)
        return token_losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        grad_hidden, hidden, weight, targets, rows = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_losses[:, None].to(grad_hidden.dtype)
        grad_weight = None
        if weight is not None:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for chunk, h, logits, _ in _chunks(hidden, weight, targets, rows, ctx.chunk_rows, True):
                logits.mul_(grad_losses.index_select(0, chunk)[:, None].to(logits.dtype))
                _add_product_float32_(grad_weight, logits.T, h)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    loss_rows: LossRows | None = None,
) -> torch.Tensor:
    """The "fused" implementation of ``linear_cross_entropy``, on any device (``chunk_rows`` rows of logits at a
    time; by default ``_CHUNK_BYTES`` of them). ``loss_rows``: ``LossRows(targets)`` made earlier (no host wait)."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.dtype)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if reduction == "none":
        if grads:
            return _FusedLinearCrossEntropyRows.apply(hidden, weight, targets, chunk_rows, loss_rows)
        return _fused_rows(hidden, weight, targets, chunk_rows, need_hidden=False, loss_rows=loss_rows)[0]
    if grads:
        total = _FusedLinearCrossEntropySum.apply(hidden, weight, targets, chunk_rows, loss_rows)
    else:
        total = _fused_sum(hidden, weight, targets, chunk_rows, need_hidden=False, need_weight=False,
                           loss_rows=loss_rows)[0]
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum()


def _cut_cross_entropy():
    """cut_cross_entropy.linear_cross_entropy (imported here only), or an ImportError that says how to install it."""
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as error:
        raise ImportError("linear_cross_entropy(impl='cce') needs cut-cross-entropy. Install it with "
                          "`pip install -e \".[gpu]\"`.") from error
    return cce


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    impl: str = "fused",
    loss_rows: LossRows | None = None,
) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] (-100 ignored) -> float32 loss: a scalar ("mean" or "sum"), or
    each row's, [N] with 0 on ignored rows ("none": what per-sequence losses such as DPO's sum).

    ``impl``: "fused" (kimitune's, any device) or "cce" (cut-cross-entropy; CUDA tensors and the package
    required; "fused" under ``kimitune.ops.force_reference``). ``loss_rows``: the fused loss's ``LossRows(targets)``,
    made before the forward's layers so that finding the rows does not wait for them."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must "
                         "be [N, H] and [V, H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be [N] = [{hidden.shape[0]}]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    if reference_forced():
        impl = "fused"
    if impl == "cce" and not hidden.is_cuda:
        raise ValueError(f"linear_cross_entropy: impl='cce' needs CUDA tensors, got {hidden.device}")
    dtype = _compute_dtype(hidden, weight)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if impl == "cce":
        return _cut_cross_entropy()(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                    reduction=reduction).float()
    return chunked_linear_cross_entropy(hidden, weight, targets, reduction, loss_rows=loss_rows)
