"""What a resumed run checks about its step count before it trains (``Trainer`` calls these).

- A checkpoint at or past the run's last step leaves nothing to train, and saving right away would write the
  checkpoint's weights as the final model, over a finished model of a later step: refused.
- A run that would end below the step of the finished model in output_dir (``final_state.json``) would replace
  that model with one trained for fewer steps: refused too.
- A different step count than the checkpoint's run had changes the learning-rate schedule (its length, and the
  warmup with ``warmup_ratio``) from the resumed step on: allowed, with a warning that says so.
"""

from __future__ import annotations

from pathlib import Path

from kimitune.config import ConfigError
from kimitune.train.checkpointing import STATE_FILE, TrainerState
from kimitune.train.run_record import finished_step


class ResumeError(ConfigError):
    """A resume that would go backwards: the message names the checkpoint's step and the run's."""


def checkpoint_state(checkpoint: Path) -> TrainerState:
    """The TrainerState a checkpoint folder holds (its step, its run's step count)."""
    return TrainerState.from_json((checkpoint / STATE_FILE).read_text())


def check_resume_target(checkpoint: Path, total_steps: int, output_dir: Path, from_epochs: bool = False) -> None:
    """Raises ``ResumeError`` when resuming from ``checkpoint`` for a run of ``total_steps`` steps would leave
    nothing to train or would end below the finished model in ``output_dir``. ``from_epochs``: the step count
    comes from num_epochs (max_steps unset), which the message then says."""
    step = checkpoint_state(checkpoint).step
    steps = f"num_epochs make {total_steps} steps" if from_epochs else f"max_steps is {total_steps}"
    if step >= total_steps:
        raise ResumeError(
            f"resume_from_checkpoint: {checkpoint} is at step {step} and {steps}: nothing is "
            f"left to train, and saving would replace the model in {output_dir} with step {step}'s weights. "
            f"Raise max_steps above {step} to train on, or resume from an earlier checkpoint "
            f"(resume_from_checkpoint: {checkpoint.parent / 'checkpoint-N'})"
        )
    finished = finished_step(output_dir)
    if finished is not None and total_steps < finished:
        raise ResumeError(
            f"{output_dir} holds a finished model of step {finished}; resuming from {checkpoint.name} (step {step}) "
            f"with max_steps {total_steps} would replace it with a model of step {total_steps}. Raise max_steps to "
            f"at least {finished}, or resume into another output_dir (resume_from_checkpoint: {checkpoint})"
        )


def schedule_change_warning(resumed: TrainerState, total_steps: int, checkpoint: Path) -> str | None:
    """A warning when the resumed run's step count differs from the one its checkpoint was written with."""
    before = resumed.total_steps
    if before is None or before == total_steps:  # checkpoints of older versions do not record it
        return None
    return (
        f"max_steps changed from {before} (when {checkpoint.name} was written) to {total_steps}: the learning-rate "
        f"schedule is rebuilt for {total_steps} steps, so from step {resumed.step + 1} on the learning rate "
        "differs from the original run's"
    )
