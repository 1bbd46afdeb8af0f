"""The training loop: steps, schedule, evaluate, log and checkpoint.

One optimizer step (``kimitune.train.step.TrainStep``) consumes ``gradient_accumulation_steps`` micro-batches from a
stream that runs through the epochs in order; the loss of a step is the mean over all label tokens of those
micro-batches (not a mean of per-batch means), so accumulation never changes what is optimised. A preference run
(``rl``) steps on packed pairs with ``kimitune.train.preference.PreferenceObjective`` instead: the mean over the
step's pairs, against reference log-probabilities computed once before the first step and kept in output_dir. A step whose loss or
gradient norm is not finite is skipped on the device (no update) and reported at the next step that reads the GPU
(logging, evaluation, saving); ``max_bad_steps`` of them in a row stop the run there, with the last good checkpoint
left intact. The steps in between never make the host wait for the GPU.

Under torchrun (``kimitune.train.distributed``) every process runs this same loop on the FSDP2-sharded model: a
step's ``gradient_accumulation_steps * world_size`` micro-batches are dealt out across the ranks, every rank's loss is
divided by the label tokens of all of them, and the sharded gradients are summed, so the step is the one a single
process makes with the same global batch. Rank 0 alone logs, shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from kimitune.config import FsdpConfig, TrainConfig
from kimitune.model import RunOptions
from kimitune.train import distributed
from kimitune.train.checkpointing import (
    TrainerState,
    load_training_state,
    resolve_resume,
    save_checkpoint,
)
from kimitune.train.metrics import MetricsLogger
from kimitune.train.model_check import check_model_source
from kimitune.train.optim import build_optimizer
from kimitune.train.output_dir import claim_output_dir
from kimitune.train.progress import status_text, training_progress
from kimitune.train.resume_checks import check_resume_target, schedule_change_warning
from kimitune.train.run_record import record_finished
from kimitune.train.schedule import build_scheduler, warmup_steps_for
from kimitune.train.settings import run_options
from kimitune.train.preference import evaluate_pairs, figures, objective_for, reference_log_probs
from kimitune.train.step import TrainStep
from kimitune.train.setup import (
    TrainingSetup,
    build_training_setup,
    builds_on_meta,
    pick_device,
    seed_everything,
)


REFERENCE_FILE = "reference_logps.pt"  # a preference run's reference log-probabilities, in its output_dir


class TrainingDiverged(RuntimeError):
    """Raised after ``max_bad_steps`` non-finite steps in a row."""


@dataclass
class TrainSummary:
    steps: int
    skipped_steps: int
    tokens: int
    seconds: float
    first_eval_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    output_dir: Path
    saved: Path | None
    loss_curve: Path | None


class BatchStream:
    """Micro-batches in training order across epochs, resumable from a (epoch, index) position.

    Every rank walks the whole stream (the batches are deterministic), so the position is the same on all ranks.
    """

    def __init__(self, setup: TrainingSetup, epoch: int, index: int) -> None:
        self.setup = setup
        self.epoch, self.index = epoch, index
        self._batches = setup.train_batches(epoch)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        while self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self.setup.train_batches(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch

    def take(self, count: int) -> list:
        return [next(self) for _ in range(count)]


class _NoMetrics:
    """What ranks other than 0 log to."""

    def log(self, record: dict) -> None:
        pass

    def plot(self, path: Path) -> None:
        return None

    def close(self) -> None:
        pass


@contextlib.contextmanager
def frozen_startup_objects() -> Iterator[None]:
    """Within: every object alive at entry (the model's modules, Parameters and buffers, the optimizer, the data)
    sits in the garbage collector's permanent generation (``gc.freeze``), so the collector's passes during the steps
    traverse only what the steps create. A training step issues thousands of kernels from Python and the GPU waits
    whenever the host falls behind, and the full passes over the model's objects showed in the 48B's tokens/s
    (``benchmarks/RESULTS.md``). On exit every frozen object is unfrozen, also those frozen before entry (freezing
    only spares the collector work, and leaving the run's own objects frozen kept a finished run's model alive, a
    cycle the collector no longer looked at)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _every(steps_per_epoch: int, explicit: int | None, per_epoch: int | None) -> int | None:
    if explicit is not None:
        return explicit
    if per_epoch is not None:
        return max(1, steps_per_epoch // per_epoch)
    return None


class Trainer:
    """Runs one training job described by a TrainConfig."""

    def __init__(self, config: TrainConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console()
        self.output_dir = Path(config.output_dir)

    def train(self) -> TrainSummary:
        world = distributed.init_from_env(pick_device(self.config).type)
        # What must be closed however the run ends (trackers' runs, the process group), last opened first.
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(world.shutdown)
            return self._train(world, cleanup)

    def _train(self, world: distributed.World, cleanup: contextlib.ExitStack) -> TrainSummary:
        config = self.config
        console = self.console if world.is_main else Console(quiet=True)
        # The lock is held until the run ends (or the process dies); see kimitune.train.output_dir.
        cleanup.enter_context(claim_output_dir(self.output_dir, config, world, console))
        resume_from = resolve_resume(self.output_dir, config.resume_from_checkpoint)
        if resume_from is not None and config.max_steps is not None:  # refused before the data and the model
            check_resume_target(resume_from, config.max_steps, self.output_dir)
        check_model_source(config, resume_from)
        if config.context_parallel_size > 1 and not distributed.launched_by_torchrun():
            raise ValueError(f"context_parallel_size: {config.context_parallel_size} splits each row across ranks: "
                             f"start the run under torchrun with a multiple of {config.context_parallel_size} "
                             "processes")
        world.split_rows(config.context_parallel_size)
        if distributed.launched_by_torchrun() and world.size > 1 and builds_on_meta(config):
            # Only rank 0 reads or draws the weights (on its CPU); the others build the modules on the meta
            # device from rank 0's config and receive their shards after sharding.
            model_config, setup = None, None
            if world.is_main:
                setup = build_training_setup(config, console, resume_from, model_device=torch.device("cpu"))
                model_config = setup.model.config
            model_config = world.broadcast_object(model_config)
            if not world.is_main:
                setup = build_training_setup(config, console, resume_from, model_device=torch.device("meta"),
                                             model_config=model_config)
            setup.model = self._shard(setup, world, console, from_rank0=True)
            console.print(f"weights built on rank 0 only; {world.size - 1} rank(s) received their shards")
        else:
            setup = build_training_setup(config, console, resume_from=resume_from)
            if distributed.launched_by_torchrun():
                setup.model = self._shard(setup, world, console)
            elif config.fsdp_config is not None:
                console.print("[yellow]warning:[/] fsdp_config has an effect only under torchrun")
        if world.rank > 0:  # the model is built; each rank draws its own dropout masks from here on
            seed_everything(config.seed + world.rank)
        model, device = setup.model, setup.device

        # One step consumes micro_batches_per_step micro-batches of the stream, dealt out across the ranks.
        micro_batches_per_step = config.gradient_accumulation_steps * world.data_size
        steps_per_epoch = max(1, math.ceil(setup.batches_per_epoch / micro_batches_per_step))
        total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
        warmup = warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio)
        eval_every = _every(steps_per_epoch, config.eval_steps, config.evals_per_epoch)
        save_every = _every(steps_per_epoch, config.save_steps, config.saves_per_epoch)
        if resume_from is not None:
            check_resume_target(resume_from, total_steps, self.output_dir, from_epochs=config.max_steps is None)

        optimizer = build_optimizer(model, config, device)
        scheduler = build_scheduler(optimizer, total_steps, warmup, config.lr_scheduler, config.cosine_min_lr_ratio)
        state = TrainerState()
        if resume_from is not None:
            state = load_training_state(resume_from, model, optimizer, world.rank)
            scheduler.load_state_dict(state.scheduler)
            console.print(f"resuming from [bold]{resume_from}[/] at step {state.step}")
            changed = schedule_change_warning(state, total_steps, resume_from)
            if changed:
                console.print(f"[yellow]warning:[/] {changed}")
        state.total_steps = total_steps  # recorded in every checkpoint, for the check above when it resumes
        metrics = MetricsLogger(config, self.output_dir, resume_step=state.step) if world.is_main else _NoMetrics()
        cleanup.callback(metrics.close)
        stream = BatchStream(setup, state.epoch, state.batch_index)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if setup.autocast_bf16 else contextlib.nullcontext()
        )
        self._eval_objective, objective = None, None
        if setup.preference is not None:
            reference = self._reference(setup, world, console, resumed=resume_from is not None) or {}
            objective = objective_for(setup.preference, reference.get("train"))
            self._eval_objective = objective_for(setup.preference, reference.get("eval"))
        train_step = TrainStep(
            model, optimizer, device, options=run_options(config, model, sharded=distributed.is_sharded(model),
                                                          context_group=world.context_group),
            max_grad_norm=config.max_grad_norm, autocast_bf16=setup.autocast_bf16, world=world,
            skipped=state.skipped_steps, bad_in_a_row=state.bad_steps_in_a_row,
            offload_activations=config.activation_offloading, objective=objective,
        )

        def save(step_state: TrainerState) -> Path:
            step_state.scheduler = scheduler.state_dict()
            return save_checkpoint(
                self.output_dir, step_state, setup.save_trainable, model, optimizer, config.save_total_limit, world
            )

        first_eval = None
        if setup.eval_batches and state.step == 0:
            first = self.evaluate(setup, autocast, world)
            first_eval = first["eval_loss"]
            metrics.log({"step": 0} | first)
        last_eval = first_eval
        cleanup.enter_context(frozen_startup_objects())
        start_time, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
        window_sums: dict[str, torch.Tensor] = {}  # the objective's figures over the logging window, on the device
        model.train()
        with training_progress(console) as progress:
            task = progress.add_task("train", total=total_steps, completed=state.step, status="")
            while state.step < total_steps:
                step_batches = stream.take(micro_batches_per_step)
                denominator = train_step.objective.denominator(step_batches)  # of the whole global batch
                stats = train_step(distributed.shard_of(step_batches, world), denominator, micro_batches_per_step)
                lr = scheduler.get_last_lr()[0]
                with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                state.step += 1
                state.epoch, state.batch_index = stream.epoch, stream.index
                step_tokens = sum(b.num_tokens for b in step_batches)
                state.tokens_seen += step_tokens
                window_tokens += step_tokens
                for name, value in stats.sums.items():
                    window_sums[name] = window_sums[name] + value if name in window_sums else value

                logging = state.step % config.logging_steps == 0 or state.step == total_steps
                evaluating = bool(setup.eval_batches and eval_every
                                  and (state.step % eval_every == 0 or state.step == total_steps))
                saving = bool(save_every and state.step % save_every == 0 and state.step < total_steps)
                record = None
                if logging or evaluating or saving:  # the steps that read the GPU
                    self._check_bad_steps(train_step, state, console)
                if logging:
                    elapsed = time.perf_counter() - window_start
                    loss, grad_norm = torch.stack([stats.loss, stats.grad_norm]).tolist()
                    record = {
                        "step": state.step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "epoch": state.epoch + state.batch_index / max(setup.batches_per_epoch, 1),
                    }
                    if window_sums:
                        names = list(window_sums)
                        record |= objective.means(dict(zip(names, torch.stack([window_sums[n] for n in names])
                                                        .tolist())))
                    window_tokens, window_start, window_sums = 0, time.perf_counter(), {}
                if evaluating:
                    evaluated = self.evaluate(setup, autocast, world)
                    last_eval = evaluated["eval_loss"]
                    model.train()
                    if state.best_eval_loss is None or last_eval < state.best_eval_loss:
                        state.best_eval_loss = last_eval
                    record = (record or {"step": state.step}) | evaluated
                if record is not None:
                    metrics.log(record)
                    progress.update(task, status=status_text(record), record=record)
                if saving:
                    save(state)
                progress.update(task, completed=state.step)

        if setup.eval_batches and eval_every is None:
            evaluated = self.evaluate(setup, autocast, world)
            last_eval = evaluated["eval_loss"]
            state.best_eval_loss = min(last_eval, state.best_eval_loss or last_eval)
            metrics.log({"step": state.step} | evaluated)
        saved = setup.save_final(self.output_dir)
        if world.is_main:
            record_finished(self.output_dir, state.step)
        curve = metrics.plot(self.output_dir / "loss_curve.png")
        # Every rank leaves together, so none tears the process group down while rank 0 is still writing (a CE-LoRA
        # run on 2 gloo ranks once aborted in teardown: "terminate called without an active exception").
        world.barrier()
        return TrainSummary(
            steps=state.step,
            skipped_steps=state.skipped_steps,
            tokens=state.tokens_seen,
            seconds=time.perf_counter() - start_time,
            first_eval_loss=first_eval,
            final_eval_loss=last_eval,
            best_eval_loss=state.best_eval_loss,
            output_dir=self.output_dir,
            saved=saved,
            loss_curve=curve,
        )

    def _check_bad_steps(self, train_step: TrainStep, state: TrainerState, console: Console) -> None:
        """Reads the step counters into ``state``: reports the steps skipped since the last read and stops the run
        after ``max_bad_steps`` bad steps in a row."""
        counters = train_step.counters()
        newly_skipped = counters.skipped - state.skipped_steps
        state.skipped_steps, state.bad_steps_in_a_row = counters.skipped, counters.bad_in_a_row
        if newly_skipped:
            console.print(f"[yellow]{newly_skipped} step(s) up to step {state.step} had a non-finite loss or gradient "
                          f"norm; their updates were skipped ({counters.bad_in_a_row}/{self.config.max_bad_steps} in "
                          "a row now)[/]")
        if counters.longest_bad_run >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"{counters.longest_bad_run} steps in a row had a non-finite loss or gradient "
                f"(the last read at step {state.step}); stopping. The last good checkpoint in "
                f"{self.output_dir} is intact: lower learning_rate or check the data, then resume."
            )

    def evaluate(self, setup: TrainingSetup, autocast, world: distributed.World) -> dict[str, float]:
        """The eval set's figures (each rank evaluates its share of the batches): ``eval_loss`` (fine-tuning: the
        mean over every label token, with ``eval_ppl``; preference tuning: the objective over the eval pairs, with
        the rewards' means as ``eval_rewards/...``)."""
        from kimitune.infer.evaluate import summed_loss

        mine = distributed.shard_of(setup.eval_batches, world)
        options = self._pass_options(world)
        spare = distributed.forward_passes_per_rank(len(setup.eval_batches), world) - len(mine)
        if setup.preference is not None:
            return self._evaluate_pairs(setup, mine, spare, autocast, world, options)
        total, count = summed_loss(setup.model, mine, autocast, options)
        if spare:  # FSDP needs as many forward passes on every rank: repeat one batch, discard its loss
            summed_loss(setup.model, setup.eval_batches[:1] * spare, autocast, options)
        total, count = world.sum(total, count / world.context_parallel)  # a context group's ranks share the batches
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    def _evaluate_pairs(self, setup: TrainingSetup, mine: list, spare: int, autocast, world: distributed.World,
                        options: RunOptions) -> dict[str, float]:
        objective = self._eval_objective
        counts = objective.denominator(setup.eval_batches)  # of the whole eval set
        values = evaluate_pairs(setup.model, mine, objective, counts, setup.device, options, autocast,
                                spare=setup.eval_batches[:1] * spare, world=world)
        return figures(world.all_reduce_sum_(values), objective)

    def _pass_options(self, world: distributed.World) -> RunOptions:
        """How passes without gradients (evaluation, the reference) run: in the pieces that bound a long sample's
        memory, each row split over the context group where there is one."""
        return RunOptions(sequence_piece_len=self.config.sequence_piece_len, context_parallel=world.context_group)

    def _reference(self, setup: TrainingSetup, world: distributed.World, console: Console,
                   resumed: bool) -> dict[str, torch.Tensor] | None:
        """The reference log-probabilities of the training and eval pairs ({"train": [N, 2], "eval": [M, 2]}), or
        None for a loss without a reference. Computed once, by the model as it starts (before the first step),
        and kept in output_dir; a resumed run reads them back (its model has moved on)."""
        if not setup.preference.uses_reference:
            return None
        path = self.output_dir / REFERENCE_FILE
        if resumed:
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: a resumed {setup.preference.kind} run needs the "
                                        "reference log-probabilities its first run wrote there")
            reference = torch.load(path)
            if reference["train"].shape[0] != len(setup.train_samples):
                raise ValueError(f"{path} holds {reference['train'].shape[0]} training examples, the data "
                                 f"{len(setup.train_samples)}: resume with the data the run started with")
            return reference
        started = time.perf_counter()
        options = self._pass_options(world)
        # Every rank computes all of it: the passes stay the same on every rank, as FSDP needs.
        reference = {
            "train": reference_log_probs(setup.model, setup.train_batches(0), len(setup.train_samples),
                                         setup.device, options),
            "eval": reference_log_probs(setup.model, setup.eval_batches, len(setup.eval_pairs), setup.device,
                                        options) if setup.eval_pairs else torch.zeros(0, 2),
        }
        if world.is_main:
            partial = path.with_suffix(".partial")
            torch.save(reference, partial)
            partial.replace(path)
        unit = "samples" if setup.preference.unpaired else "pairs"
        console.print(f"reference log-probabilities of {len(setup.train_samples)} + {len(setup.eval_pairs)} {unit} "
                      f"in {time.perf_counter() - started:.1f} s (the model as it starts), kept in {path.name}")
        return reference

    def _shard(self, setup: TrainingSetup, world: distributed.World, console: Console, from_rank0: bool = False):
        """The model sharded with FSDP2; ``from_rank0``: only rank 0 holds weights (ranks > 0 built on the meta
        device), and every rank's shards are filled from rank 0's state dict (a collective)."""
        fsdp = self.config.fsdp_config or FsdpConfig()
        console.print(f"FSDP2 over {world.size} process(es) ({world.device.type}): each decoder layer sharded"
                      + (", parameters offloaded to the CPU" if fsdp.offload_params else ""))
        full_state = setup.model.state_dict() if (from_rank0 and world.is_main) else None  # before sharding
        model = distributed.shard_model(
            setup.model, world, bf16=setup.bf16, offload_params=fsdp.offload_params,
            pin_memory=fsdp.cpu_offload_pin_memory, reshard_after_forward=fsdp.reshard_after_forward,
        )
        if from_rank0:
            distributed.fill_from_rank0(model, full_state, torch.device("cpu") if fsdp.offload_params else world.device)
        return model
