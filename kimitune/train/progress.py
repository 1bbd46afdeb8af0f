"""How a run shows its progress: a live bar in a terminal, one plain line per logged step anywhere else.

A live bar redraws one line; written to a file or a pipe (a job's log, ``| tee``) only its last state survives,
cut at the console's width. So when the console is not a terminal every logged step prints a line of its own:

    step 25/51  loss 2.3456  lr 2.86e-03  grad norm 1.234  2,612 tokens/s  eta 0:00:11

Both kinds take the same calls (rich's ``Progress`` API): ``add_task``, then ``update(task, status=..., record=...)``
with each logged record and ``update(task, completed=step)`` after each step.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def status_text(record: dict) -> str:
    """The short status the live bar shows beside it."""
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s")
    if "rewards/accuracies" in record:
        parts.append(f"acc {record['rewards/accuracies']:.2f}")
    if "kl" in record:
        parts.append(f"kl {record['kl']:.3f}")
    if "eval_loss" in record:
        parts.append(f"eval {record['eval_loss']:.4f}")
    return "  ".join(parts)


def step_line(record: dict, total: int, eta_seconds: float | None) -> str:
    """One logged step as a plain line: step, loss, lr, grad norm, tokens/s, eta, and the eval loss if any."""
    parts = [f"step {record['step']}/{total}"]
    if "loss" in record:
        parts += [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"grad norm {record['grad_norm']:.3f}",
                  f"{record['tokens_per_s']:,.0f} tokens/s"]
    if "rewards/accuracies" in record:  # a preference run: pairs ranked right, and the mean reward margin
        parts.append(f"reward acc {record['rewards/accuracies']:.2f} margin {record['rewards/margins']:.3f}")
    if "kl" in record:  # KTO: the KL estimate, and the mean rewards' margin when the window had both labels
        parts.append(f"kl {record['kl']:.3f}" + (f" margin {record['rewards/margins']:.3f}"
                                                  if "rewards/margins" in record else ""))
    if "eval_loss" in record:
        parts.append(f"eval loss {record['eval_loss']:.4f}")
    if "eval_rewards/accuracies" in record:
        parts.append(f"eval reward acc {record['eval_rewards/accuracies']:.2f}")
    if eta_seconds is not None:
        parts.append(f"eta {datetime.timedelta(seconds=round(eta_seconds))}")
    return "  ".join(parts)


class PlainProgress:
    """``Progress``'s calls, printing a line per logged record instead of drawing a bar (one task only)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.total = 0
        self.started_at = 0  # the step the run started from (a resumed run's checkpoint step)
        self.started = time.perf_counter()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: int, completed: int = 0, **fields: Any) -> int:
        self.total, self.started_at, self.started = total, completed, time.perf_counter()
        return 0

    def eta(self, step: int) -> float | None:
        """Seconds left at the pace of this process's steps so far."""
        done = step - self.started_at
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def update(self, task: int, record: dict | None = None, **fields: Any) -> None:
        if record is not None:
            self.console.print(step_line(record, self.total, self.eta(record["step"])), highlight=False,
                               soft_wrap=True)


def training_progress(console: Console) -> Progress | PlainProgress:
    """A live bar on a terminal, plain lines otherwise (see the module docstring)."""
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
