"""One training run per ``output_dir``: the folder checks, the lock, and what to do with an earlier run's files.

``claim_output_dir`` runs before anything else of a training run and returns the held lock:

- ``output_dir`` must be a folder (or creatable as one): a file there is an error naming the path.
- A lock (``fcntl.flock`` on ``<output_dir>/.kimitune.lock``) is held until the run ends. The kernel releases a
  flock when its process dies, however it dies, so a killed run never leaves a stuck lock behind; the file itself
  stays and means nothing while nobody holds it. It records who holds it, for the error a second run gets.
- A folder that already holds a run (its metrics, checkpoints, saved model) is refused unless the new run resumes
  from one of its checkpoints or ``overwrite_output_dir`` is set; with overwrite, the files kimitune writes there
  are deleted first (anything else in the folder is left alone), so metrics.jsonl starts fresh.
- Half-written checkpoint folders of a killed run are removed only once the lock is held (before, they might have
  been a live run's).

Under torchrun rank 0 does all of this and tells the other ranks the outcome, so every rank fails with the same
message or none does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from rich.console import Console

from kimitune.config import ConfigError, TrainConfig
from kimitune.train.checkpointing import remove_stale_temporaries, resolve_resume
from kimitune.train.distributed import World
from kimitune.train.run_record import FINISHED_FILE

LOCK_FILE = ".kimitune.lock"

# What training writes into output_dir (the folder may hold other files, which are never touched). The first group
# shows that the folder holds a run; the second are written beside them (the saved model's config and tokenizer).
RUN_PATTERNS = (
    "metrics.jsonl", FINISHED_FILE, "checkpoint-*", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "adapter_model.safetensors", "adapter_config.json",
)
COMPANION_PATTERNS = (
    ".checkpoint-*.tmp-*", "loss_curve.png", "tensorboard", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "tiktoken.model",
)


class OutputDirError(ConfigError):
    """An output_dir a run cannot use: a file, locked by another run, or holding a run it would overwrite."""


class RunLock:
    """An exclusive ``flock`` on a lock file, held from ``acquire`` until ``release`` or the process's end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock without waiting; raises ``OutputDirError`` naming the holder when another has it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirError(
                f"output_dir {self.path.parent} is in use by another kimitune run ({holder}): one run per "
                "output_dir; wait for it to finish, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "holder unknown"


def run_files(output_dir: Path, patterns: tuple[str, ...] = RUN_PATTERNS) -> list[Path]:
    """The files and folders in ``output_dir`` that match ``patterns``, sorted by name."""
    found = {path for pattern in patterns for path in output_dir.glob(pattern)}
    return sorted(found, key=lambda p: p.name)


def clear_run(output_dir: Path) -> list[Path]:
    """Deletes every file and folder training writes in ``output_dir``; returns what it deleted."""
    removed = run_files(output_dir, RUN_PATTERNS + COMPANION_PATTERNS)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def _listing(paths: list[Path], limit: int = 5) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _resumes_inside(output_dir: Path, config: TrainConfig) -> Path | None:
    """The checkpoint in ``output_dir`` the run resumes from, if any."""
    checkpoint = resolve_resume(output_dir, config.resume_from_checkpoint)
    if checkpoint is not None and checkpoint.resolve().parent == output_dir.resolve():
        return checkpoint
    return None


def _prepare(output_dir: Path, config: TrainConfig, console: Console) -> RunLock:
    """Rank 0's part: checks, lock, the earlier run's files (see the module docstring)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} is a file, not a folder: remove it or choose another "
                             "output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputDirError(f"output_dir {output_dir} cannot be made: a part of that path is a file") from None
    except PermissionError as err:
        raise OutputDirError(f"output_dir {output_dir} cannot be made: {err.strerror}") from None
    lock = RunLock(output_dir / LOCK_FILE).acquire()
    try:
        _handle_earlier_run(output_dir, config, console)
        removed = remove_stale_temporaries(output_dir)
        if removed:
            console.print(f"[yellow]removed {removed} half-written checkpoint folder(s) from a killed run[/]")
    except BaseException:
        lock.release()
        raise
    return lock


def _handle_earlier_run(output_dir: Path, config: TrainConfig, console: Console) -> None:
    resumed = _resumes_inside(output_dir, config)
    if config.overwrite_output_dir and resumed is not None:
        raise OutputDirError(
            f"overwrite_output_dir deletes {output_dir}'s checkpoints, and resume_from_checkpoint would continue "
            f"from {resumed.name} there: set only one of them"
        )
    existing = run_files(output_dir)
    if not existing or resumed is not None:
        return
    if config.overwrite_output_dir:
        removed = clear_run(output_dir)
        console.print(f"[yellow]overwrite_output_dir: removed the previous run's files from {output_dir} "
                      f"({_listing(removed)})[/]")
        return
    found = f"output_dir {output_dir} already holds a run ({_listing(existing)})"
    if config.resume_from_checkpoint is True:
        found += " but no checkpoint to resume from"
    raise OutputDirError(
        f"{found}: continue it with --resume-from-checkpoint (resume_from_checkpoint: true, from its latest "
        "checkpoint), start over with --overwrite-output-dir (overwrite_output_dir: true deletes its files), or "
        "choose another output_dir"
    )


def claim_output_dir(
    output_dir: Path, config: TrainConfig, world: World, console: Console
) -> contextlib.AbstractContextManager:
    """Prepares ``output_dir`` for this run and returns its lock (a context manager that releases it); every rank
    calls it, rank 0 does the work. Raises ``OutputDirError`` on every rank when the folder cannot be used."""
    lock, problem = contextlib.nullcontext(), None
    if world.is_main:
        try:
            lock = _prepare(output_dir, config, console)
        except (OutputDirError, OSError) as err:  # told to every rank, so none waits for the others forever
            problem = str(err)
    problem = world.broadcast_object(problem)
    if problem is not None:
        raise OutputDirError(problem)
    return lock
