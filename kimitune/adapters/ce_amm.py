"""CE-LoRA's approximated input gradient of a frozen product (AMM + Double-LoRA): the maths, no targeting.

A frozen weight ``W`` [out, in] maps ``x`` [N, in] to ``y = x W^T``; its input gradient ``dX = dY W`` [N, in] is a
sum over the ``out`` rows of ``W``: ``dX = sum_i dY[:, i] W[i, :]``. CE-LoRA (Chen et al., arXiv 2502.01378)
computes it as

    dX ~= (dY B0) A0 + dY[:, S] R[S, :]        with R = W - B0 A0

- Double-LoRA: ``A0`` [r0, in], ``B0`` [out, r0] are a fixed rank-``r0`` truncated SVD of ``W``
  (``B0 = U sqrt(s)``, ``A0 = sqrt(s) V^T``), never trained, so every row of ``W`` reaches ``dX`` at least
  through its low-rank part and only the residual ``R`` is sampled;
- AMM: ``S`` holds the ``k`` rows ``i`` with the largest ``||dY[:, i]|| * ||R[i, :]||`` (deterministic top-k,
  no rescaling); the dropped part ``sum_{i not in S} dY[:, i] R[i, :]`` is the one with the smallest norm bound.

``S`` is chosen from the current ``dY`` once every ``refresh_steps`` backward passes and kept in between (the
residual row norms ``||R[i, :]||`` are constant: computed once). At each refresh ``R[S, :]`` is gathered into a
contiguous [k, in] buffer, so every backward runs dense GEMMs of N x k x in, N x out x r0 and N x r0 x in
multiply-adds instead of N x out x in, and reads ``k / out`` of the weight's bytes.

Stacked experts (``W`` [E, out, in], rows of ``dY`` sorted by expert with cumulative ``offsets`` [E]) do the same per
expert (``A0_e``, ``B0_e``, ``S_e`` from the expert's own rows of ``dY``), with one ``k`` for the whole stack so the
kept rows form one [E, k, in] tensor for the grouped matmul. An expert that got no rows at a refresh ranks its
rows by ``||R_e[i, :]||`` alone.

Layer-wise adaptive sparsity (``adaptive``): at each refresh a layer keeps the fewest rows (a multiple of 8) whose
scores hold ``1 - sparsity`` of the layer's total score; for experts, the most any expert needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd import Function

from kimitune.ops.grouped_mm import grouped_linear
from kimitune.quant.matmul import dequantized

# Kept rows and Double-LoRA ranks are rounded up to multiples of 8, so every bf16 row the grouped matmul reads is a
# multiple of 16 bytes (what torch._grouped_mm needs on the GPU; otherwise it falls back to a per-expert loop).
ROW_ALIGN = 8
# Extra columns of the randomised SVD's sketch (Halko et al. 2011), and its power iterations.
SVD_OVERSAMPLE = 8
SVD_POWER_ITERATIONS = 2
# float32 temporaries of expert stacks are processed in chunks of about this many bytes.
CHUNK_BYTES = 1 << 30


def round_up(n: int, multiple: int = ROW_ALIGN) -> int:
    return -(-n // multiple) * multiple


def kept_row_count(out_features: int, sparsity: float) -> int:
    """Rows kept at ``sparsity``: ``ceil((1 - sparsity) * out)`` rounded up to a multiple of 8, at most ``out``."""
    return min(out_features, round_up(math.ceil((1.0 - sparsity) * out_features)))


def _expert_chunks(weight: torch.Tensor) -> Iterator[slice]:
    """Slices of the expert dim whose float32 [chunk, out, in] copies stay near ``CHUNK_BYTES``."""
    per_expert = 4 * weight.shape[-2] * weight.shape[-1]
    step = max(1, CHUNK_BYTES // per_expert)
    for start in range(0, weight.shape[0], step):
        yield slice(start, start + step)


@torch.no_grad()
def double_lora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)``: the best rank-``rank`` factors of ``weight`` by a randomised truncated SVD, in its dtype.

    ``weight`` [out, in] -> A0 [rank, in], B0 [out, rank]; [E, out, in] -> [E, rank, in], [E, out, rank], one
    SVD per expert. ``B0 A0 ~= W``'s top-``rank`` part (exact when ``rank + 8 >= min(out, in)``). The sketch is
    drawn from a fixed seed on a forked RNG, so the global random stream (LoRA init, dropout) is untouched.
    """
    out_features, in_features = weight.shape[-2:]
    sketch = min(rank + SVD_OVERSAMPLE, out_features, in_features)
    stacked = weight if weight.dim() == 3 else weight.unsqueeze(0)
    a0 = torch.empty(stacked.shape[0], rank, in_features, dtype=weight.dtype, device=weight.device)
    b0 = torch.empty(stacked.shape[0], out_features, rank, dtype=weight.dtype, device=weight.device)
    with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
        torch.manual_seed(0)
        for part in _expert_chunks(stacked):
            u, s, v = torch.svd_lowrank(stacked[part].float(), q=sketch, niter=SVD_POWER_ITERATIONS)
            root = s[:, :rank].sqrt()
            b0[part] = (u[:, :, :rank] * root[:, None, :]).to(weight.dtype)
            a0[part] = (v[:, :, :rank] * root[:, None, :]).transpose(1, 2).to(weight.dtype)
    if weight.dim() == 2:
        return a0[0], b0[0]
    return a0, b0


@torch.no_grad()
def residual_row_norms(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """``||W[i, :] - B0[i, :] A0||`` in float32: [out] for [out, in], [E, out] for [E, out, in]."""
    stacked = weight if weight.dim() == 3 else weight.unsqueeze(0)
    a0s, b0s = (t if t.dim() == 3 else t.unsqueeze(0) for t in (a0, b0))
    norms = torch.empty(stacked.shape[:2], dtype=torch.float32, device=weight.device)
    for part in _expert_chunks(stacked):
        residual = stacked[part].float() - torch.bmm(b0s[part].float(), a0s[part].float())
        norms[part] = torch.linalg.vector_norm(residual, dim=-1)
    return norms if weight.dim() == 3 else norms[0]


def adaptive_row_count(scores: torch.Tensor, keep_mass: float, max_rows: int) -> int:
    """The fewest rows (a multiple of 8, at most ``max_rows``) whose top scores hold ``keep_mass`` of each row
    group's total; ``scores`` [out] or [E, out]. One host sync (the count sets the kept buffer's shape)."""
    ordered = scores.reshape(-1, scores.shape[-1]).sort(dim=-1, descending=True).values
    covered = ordered.cumsum(-1)
    needed = (covered < keep_mass * covered[:, -1:]).sum(-1) + 1
    return min(max_rows, round_up(int(needed.max())))


def top_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores along the last dim, ascending (sorted rows gather faster)."""
    return scores.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values


def expert_of_rows(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[N] int64: the expert of each row, for rows sorted by expert with cumulative ends ``offsets`` (no sync)."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True)


def reduced_input_grad(
    grad_output: torch.Tensor, index: torch.Tensor, kept_residual: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
) -> torch.Tensor:
    """``dY[:, S] R[S, :] + (dY B0) A0``: dY [N, out], S [k], R[S, :] [k, in], A0 [r0, in], B0 [out, r0] -> [N, in]."""
    grad_input = grad_output.index_select(1, index) @ kept_residual
    if b0.shape[-1]:
        grad_input.addmm_(grad_output @ b0, a0)
    return grad_input


def reduced_expert_input_grad(
    grad_output: torch.Tensor,
    offsets: torch.Tensor,
    index: torch.Tensor,
    kept_residual: torch.Tensor,
    a0: torch.Tensor,
    b0: torch.Tensor,
) -> torch.Tensor:
    """Per expert ``e``: ``dY_e[:, S_e] R_e[S_e, :] + (dY_e B0_e) A0_e``; dY [N, out] sorted by expert, S [E, k],
    R[S] [E, k, in], A0 [E, r0, in], B0 [E, out, r0] -> [N, in], as grouped matmuls."""
    kept = grad_output.gather(1, index[expert_of_rows(offsets, grad_output.shape[0])])
    grad_input = grouped_linear(kept, kept_residual.transpose(1, 2), offsets)
    if b0.shape[-1]:
        low = grouped_linear(grad_output, b0.transpose(1, 2), offsets)
        grad_input = grad_input + grouped_linear(low, a0.transpose(1, 2), offsets)
    return grad_input


class RowSampledInputGrad(nn.Module):
    """The approximated ``dX = dY W`` of one frozen weight [out, in] or expert stack [E, out, in].

    Holds the Double-LoRA factors ``a0``/``b0``, the residual row norms, the kept rows ``index`` ([k] or [E, k])
    and ``kept_residual`` (``R[S, :]``, [k, in] or [E, k, in], in the weight's dtype). All are non-persistent
    buffers: they are rebuilt from the frozen weight and never saved. The weight itself stays with its owner and
    is passed in, so it is not registered twice.
    """

    def __init__(self, weight: torch.Tensor, sparsity: float, double_rank: int, refresh_steps: int, adaptive: bool):
        super().__init__()
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"CE-LoRA sparsity must be in (0, 1) for an approximated product, got {sparsity!r}")
        weight = dequantized(weight)  # a quantised base (QLoRA): the SVD and row norms of its dequantised values
        if refresh_steps <= 0:
            raise ValueError(f"CE-LoRA refresh_steps must be positive, got {refresh_steps!r}")
        out_features, in_features = weight.shape[-2:]
        self.stacked = weight.dim() == 3
        self.groups = weight.shape[0] if self.stacked else 1  # experts in the stack
        self.out_features, self.in_features = out_features, in_features
        self.sparsity, self.adaptive, self.refresh_steps = sparsity, adaptive, refresh_steps
        self.max_rows = kept_row_count(out_features, sparsity)
        self.double_rank = min(round_up(double_rank), out_features, in_features) if double_rank > 0 else 0
        if self.double_rank:
            a0, b0 = double_lora_factors(weight.detach(), self.double_rank)
        else:
            lead = weight.shape[:-2]
            a0 = weight.new_zeros(*lead, 0, in_features)
            b0 = weight.new_zeros(*lead, out_features, 0)
        self.register_buffer("a0", a0, persistent=False)
        self.register_buffer("b0", b0, persistent=False)
        self.register_buffer("residual_norm", residual_row_norms(weight.detach(), a0, b0), persistent=False)
        self.register_buffer("index", None, persistent=False)
        self.register_buffer("kept_residual", None, persistent=False)
        self.backward_passes = 0

    @property
    def kept_rows(self) -> int:
        """Rows of the current selection (before the first backward: the most it will keep)."""
        return self.max_rows if self.index is None else self.index.shape[-1]

    def input_grad(
        self, weight: torch.Tensor, grad_output: torch.Tensor, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """dY [N, out] (rows sorted by expert with ``offsets`` for a stack) -> approximated dX [N, in]."""
        grad_output = grad_output.to(weight.dtype)
        if self.backward_passes % self.refresh_steps == 0:
            self.refresh(weight, grad_output, offsets)
        self.backward_passes += 1
        if self.stacked:
            return reduced_expert_input_grad(grad_output, offsets, self.index, self.kept_residual, self.a0, self.b0)
        return reduced_input_grad(grad_output, self.index, self.kept_residual, self.a0, self.b0)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, grad_output: torch.Tensor, offsets: torch.Tensor | None) -> None:
        """Chooses the kept rows from this ``dY`` and gathers their residual rows ``R[S, :]``."""
        weight = dequantized(weight)
        squares = grad_output.float().square()
        if self.stacked:
            column_sq = squares.new_zeros(weight.shape[0], self.out_features)
            column_sq.index_add_(0, expert_of_rows(offsets, grad_output.shape[0]), squares)
            has_rows = torch.diff(offsets, prepend=offsets.new_zeros(1)) > 0
            scores = torch.where(has_rows[:, None], column_sq.sqrt() * self.residual_norm, self.residual_norm)
        else:
            scores = squares.sum(0).sqrt() * self.residual_norm
        count = adaptive_row_count(scores, 1.0 - self.sparsity, self.max_rows) if self.adaptive else self.max_rows
        self.index = top_rows(scores, count)
        self.kept_residual = None  # free the old rows before gathering the new ones
        self.kept_residual = self._gather_residual(weight, self.index)

    def _gather_residual(self, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.stacked:
            rows = weight.index_select(0, index).float()
            if self.double_rank:
                rows -= self.b0.index_select(0, index).float() @ self.a0.float()
            return rows.to(weight.dtype)
        kept = weight.new_empty(weight.shape[0], index.shape[1], self.in_features)
        for part in _expert_chunks(kept):
            idx = index[part, :, None]
            rows = weight[part].gather(1, idx.expand(-1, -1, self.in_features)).float()
            if self.double_rank:
                b0_rows = self.b0[part].gather(1, idx.expand(-1, -1, self.double_rank))
                rows -= torch.bmm(b0_rows.float(), self.a0[part].float())
            kept[part] = rows.to(weight.dtype)
        return kept

    def extra_repr(self) -> str:
        return (f"sparsity={self.sparsity:g}, kept_rows={self.kept_rows}/{self.out_features}, "
                f"double_rank={self.double_rank}, refresh_steps={self.refresh_steps}, adaptive={self.adaptive}")


def _keep_weight(ctx, weight, *tensors: torch.Tensor) -> None:
    """Saves a float weight (and ``tensors``) for backward; a quantised one is kept as a reference (its buffers
    live in the model anyway)."""
    if isinstance(weight, torch.Tensor):
        ctx.weight = None
        ctx.save_for_backward(weight, *tensors)
    else:
        ctx.weight = weight
        ctx.save_for_backward(*tensors)


def _kept_weight(ctx):
    """What ``_keep_weight`` kept: the weight alone, or ``(weight, *tensors)``."""
    saved = ctx.saved_tensors
    if ctx.weight is not None:
        saved = (ctx.weight, *saved)
    return saved[0] if len(saved) == 1 else saved


class ApproxLinearFunction(Function):
    """``F.linear(x, W, b)`` exactly forward; backward gives only dX, through ``RowSampledInputGrad``.

    ``W`` may be a ``QuantizedWeight`` (QLoRA base): dequantised for the forward product and, in the backward,
    only when the kept rows are refreshed."""

    @staticmethod
    def forward(ctx, x, weight, bias, approx: RowSampledInputGrad):
        ctx.approx, ctx.input_shape, ctx.input_dtype = approx, x.shape, x.dtype
        _keep_weight(ctx, weight)
        return torch.nn.functional.linear(x, dequantized(weight), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight = _kept_weight(ctx)
        grad = ctx.approx.input_grad(weight, grad_output.reshape(-1, grad_output.shape[-1]))
        return grad.reshape(ctx.input_shape).to(ctx.input_dtype), None, None, None


class ApproxGroupedLinearFunction(Function):
    """``grouped_linear(x, W, offsets)`` exactly forward; backward gives only dX, through ``RowSampledInputGrad``."""

    @staticmethod
    def forward(ctx, x, weight, offsets, approx: RowSampledInputGrad):
        ctx.approx, ctx.input_dtype = approx, x.dtype
        _keep_weight(ctx, weight, offsets)
        return grouped_linear(x, dequantized(weight), offsets)

    @staticmethod
    def backward(ctx, grad_output):
        weight, offsets = _kept_weight(ctx)
        grad = ctx.approx.input_grad(weight, grad_output, offsets)
        return grad.to(ctx.input_dtype), None, None, None
