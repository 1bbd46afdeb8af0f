"""One optimizer step, micro-batches in and step statistics out: what the Trainer runs and the training benchmarks time.

    step = TrainStep(model, optimizer, device, options=RunOptions(...), max_grad_norm=1.0, objective=TokenLoss())
    stats = step(micro_batches, denominator, micro_batches_per_step)   # StepStats: tensors on the device
    stats.loss.item(), step.counters()                                  # host reads: at logging steps only

What a step optimises is its objective's: ``TokenLoss`` (fine-tuning, the default) is the mean over every label
token of the global batch (``denominator``, ``TokenLoss.denominator(batches)``: the label tokens of all
``micro_batches_per_step`` micro-batches, over all ranks); a preference objective (``kimitune.train.preference``)
the mean over its pairs. Each micro-batch's loss is divided by the global count before its backward, so
accumulation never changes what is optimised. The load-balancing loss is averaged over the micro-batches.

Nothing in a step waits for the GPU: the host queues the next step's kernels while the GPU runs this one. The batch
goes to the device from pinned memory without blocking; the batch layout is built once (``BatchLayout``); the loss
is summed over the ranks on the device; and the non-finite check and the skip happen on the device, as GradScaler's
``found_inf``: the fused AdamW takes the flag and leaves parameters, moments and step count as they were when it is
set. (bitsandbytes' 8-bit AdamW has no such flag: its steps read the flag on the host.) How many steps were skipped,
and the longest run of bad steps, are counted on the device too and read with ``counters()``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kimitune.data.packing import Batch
from kimitune.model import RunOptions
from kimitune.ops import BatchLayout, tuned_kernels
from kimitune.train import distributed
from kimitune.train.offload import HostOffload


@dataclass
class StepStats:
    """One step's figures, float32 scalars on the device: loss (the objective over the global batch: for
    fine-tuning the mean over its label tokens), grad_norm (before clipping), finite (bool: the update was made),
    and ``sums``: the objective's own figures summed over the global batch (a preference run's rewards; empty for
    fine-tuning)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MicroBatchLoss:
    """What an objective gives for one micro-batch: ``loss`` to backpropagate (already divided by the global
    batch's count, so that accumulation never changes what is optimised), ``reported`` (its detached float32
    value, summed into the step's loss), ``sums`` (figures summed over the step, or empty) and ``aux_loss`` (the
    model's load-balancing loss, or None)."""

    loss: torch.Tensor
    reported: torch.Tensor
    sums: dict[str, torch.Tensor]
    aux_loss: torch.Tensor | None


class TokenLoss:
    """Fine-tuning's objective: the mean token cross-entropy over every label token of the global batch."""

    def denominator(self, batches: list[Batch]) -> int:
        """The global batch's label tokens (``batches``: every rank's micro-batches of the step)."""
        return sum(b.num_label_tokens for b in batches)

    def __call__(self, model: nn.Module, batch: Batch, input_ids: torch.Tensor, layout, options: RunOptions,
                 denominator: int) -> MicroBatchLoss:
        out = model(input_ids, labels=to_device(batch.labels, input_ids.device), cu_seqlens=layout,
                    return_logits=False, loss_reduction="sum", options=options)
        loss = out.loss / max(denominator, 1)
        return MicroBatchLoss(loss, loss.detach().float(), {}, out.aux_loss)


@dataclass
class StepCounters:
    """Host copies of the device counters: steps skipped in all, the bad steps in a row at the last step, and the
    longest run of bad steps since the previous read."""

    skipped: int
    bad_in_a_row: int
    longest_bad_run: int


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes GradScaler's ``found_inf`` flag: torch's Adam and AdamW with ``fused=True``."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without the host waiting: a pageable copy to a GPU waits for the copy (and the
    queue before it), one from pinned memory does not."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class TrainStep:
    """Runs optimizer steps of ``model`` (its parameters that require grad) with ``optimizer``.

    ``max_grad_norm`` None or 0: no clipping (the norm is still computed and reported). ``autocast_bf16``: the
    forwards run under CUDA bf16 autocast. ``world``: the ranks the loss is summed over (None: one process).
    ``skipped`` / ``bad_in_a_row``: counters to continue from (a resumed run's). ``offload_activations``: what the
    forwards save for the backward waits in pinned host memory (``kimitune.train.offload``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *,
                 options: RunOptions = RunOptions(), max_grad_norm: float | None = None, autocast_bf16: bool = False,
                 world: distributed.World | None = None, skipped: int = 0, bad_in_a_row: int = 0,
                 offload_activations: bool = False, objective=None) -> None:
        self.model, self.optimizer, self.device, self.options = model, optimizer, torch.device(device), options
        self.objective = objective or TokenLoss()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = max_grad_norm if max_grad_norm else float("inf")
        self.autocast_bf16 = autocast_bf16
        self.offload = HostOffload() if offload_activations else None
        self.world = world
        self.device_skip = skips_on_device(optimizer)
        counter = lambda value: torch.tensor(value, dtype=torch.int64, device=self.device)  # noqa: E731
        self._skipped, self._bad_in_a_row = counter(skipped), counter(bad_in_a_row)
        self._longest_bad_run = counter(bad_in_a_row)
        self._first_step_done = False

    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, micro_batches: list, denominator, micro_batches_per_step: int = 1) -> StepStats:
        """Forward and backward of this rank's ``micro_batches``, clipping, the update (unless a loss or the gradient
        norm is not finite) and zeroed gradients. ``denominator``: the objective's count of the whole global batch
        (``objective.denominator``; for fine-tuning its label tokens)."""
        step_loss = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        if hasattr(self.objective, "begin_step"):  # a figure of the whole step first: KTO's KL estimate
            with self._autocast():
                self.objective.begin_step(self.model, micro_batches, self.device, self.options, self.world)
        for batch in micro_batches:
            input_ids = to_device(batch.input_ids, self.device)
            layout = BatchLayout.of(batch.cu_seqlens, self.device, input_ids.shape[1])
            with self._autocast(), self.offload or contextlib.nullcontext():
                part = self.objective(self.model, batch, input_ids, layout, self.options, denominator)
            loss = part.loss
            if part.aux_loss is not None:  # already scaled by router_aux_loss_coef
                loss = loss + part.aux_loss / micro_batches_per_step
            loss.backward()
            step_loss += part.reported
            for name, value in part.sums.items():
                sums[name] = sums[name] + value if name in sums else value
        if self.world is not None:
            distributed.sum_over_context(self.params, self.world)  # a split row's ranks each hold part of its grads
        grad_norm = distributed.clip_grad_norm(self.params, self.max_norm).float()
        if self.world is not None:
            self.world.all_reduce_sum_(step_loss)
            if sums:
                stacked = torch.stack(list(sums.values()))
                self.world.all_reduce_sum_(stacked)
                sums = dict(zip(sums, stacked.unbind()))
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
        self._update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        bad = (~finite).long()
        self._skipped += bad
        self._bad_in_a_row.mul_(bad).add_(bad)  # +1 after a bad step, 0 after a good one
        torch.maximum(self._longest_bad_run, self._bad_in_a_row, out=self._longest_bad_run)
        if not self._first_step_done:  # the first step tuned fla's kernels: keep the choices for the next process
            self._first_step_done = True
            tuned_kernels.save_tuned_configs()
        return StepStats(step_loss, grad_norm, finite, sums)

    def _update(self, finite: torch.Tensor) -> None:
        if not self.device_skip:
            if finite.item():  # the one host read of a step, for optimizers that cannot skip on the device
                self.optimizer.step()
            return
        self.optimizer.found_inf = (~finite).float()  # GradScaler's protocol for fused optimizers
        self.optimizer.grad_scale = None
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale

    def counters(self) -> StepCounters:
        """Reads the counters (a host sync: call it at logging, evaluation and saving steps) and starts a new window
        for the longest bad run."""
        skipped, bad_in_a_row, longest = torch.stack([self._skipped, self._bad_in_a_row, self._longest_bad_run]).tolist()
        self._longest_bad_run.copy_(self._bad_in_a_row)
        tuned_kernels.save_tuned_configs()  # an evaluation or a new shape may have tuned more
        return StepCounters(skipped, bad_in_a_row, longest)
