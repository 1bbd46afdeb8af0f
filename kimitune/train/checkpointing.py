"""Training checkpoints: written atomically, rotated by save_total_limit, resumed exactly.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` holding the trainable weights (an adapter in PEFT
format, or the whole model in the release layout), ``optimizer/`` (a ``torch.distributed.checkpoint`` folder: the
optimizer state by parameter name), ``rng_state.{json,safetensors}`` (rank r > 0 of a multi-process run adds
``rng_state.rank<r>.*``) and ``trainer_state.json`` (step, data position, scheduler state, counters). It is first
written to a hidden temporary folder beside it, flushed to disk and then renamed, so a run killed at any moment
leaves either the whole checkpoint or none, and the previous checkpoints stay intact.

One format for one process and for N (``kimitune.train.distributed``): the weights are whole tensors written by
rank 0, the optimizer state is keyed by parameter name and saved by DCP, each rank writing its shards. Either part
loads on any number of processes, with or without a process group, so a run can resume on another world size
(exactly so for everything but the dropout masks of ranks that did not exist when it was written).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from kimitune.train.distributed import World

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps taken (including skipped non-finite steps)
    epoch: int = 0  # data position: the epoch of the next micro-batch ...
    batch_index: int = 0  # ... and its index within that epoch's batches
    tokens_seen: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    best_eval_loss: float | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    total_steps: int | None = None  # the run's step count, which its schedule spans (None: written before it was kept)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The state of every random generator the loop draws from: (JSON-able part, tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = cuda_state
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_file(rank: int, suffix: str) -> str:
    return f"rng_state.{suffix}" if rank == 0 else f"rng_state.rank{rank}.{suffix}"


def _dcp_options() -> dict[str, Any]:
    """DCP runs without a process group in a single process (and warns that it does; it is meant here)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    return {"no_dist": not dist.is_initialized()}


def save_optimizer(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state by parameter name, through DCP (every rank writes its shards; a collective)."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory),
             **_dcp_options())


def load_optimizer(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads what ``save_optimizer`` wrote, on any number of processes (resharded by name); a collective."""
    template = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # also creates the state to fill
    dcp.load(template, checkpoint_id=str(directory), **_dcp_options())
    set_optimizer_state_dict(model, optimizer, template["optimizer"])


def save_checkpoint(
    output_dir: Path,
    state: TrainerState,
    save_weights: Callable[[Path], None],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    save_total_limit: int | None = None,
    world: World | None = None,
) -> Path:
    """Writes ``checkpoint-<state.step>`` atomically and removes the oldest beyond ``save_total_limit``.

    With several processes every rank calls it: ``save_weights`` (gathers, rank 0 writes) and the optimizer are
    collectives; rank 0 makes, flushes, renames and rotates the folders.
    """
    world = world or World()
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=output_dir)) if world.is_main else None
    tmp = world.broadcast_object(tmp)
    try:
        save_weights(tmp)
        save_optimizer(tmp / "optimizer", model, optimizer)
        plain_rng, tensor_rng = rng_state()
        save_file(tensor_rng, str(tmp / _rng_file(world.rank, "safetensors")))
        (tmp / _rng_file(world.rank, "json")).write_text(json.dumps(plain_rng))
        world.barrier()
        if world.is_main:
            (tmp / STATE_FILE).write_text(state.to_json())
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
                shutil.rmtree(final)
            os.rename(tmp, final)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit is not None and world.is_main:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    world.barrier()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are never listed)."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def remove_stale_temporaries(output_dir: Path) -> int:
    """Deletes half-written checkpoint folders left by a killed run; returns how many."""
    if not output_dir.is_dir():
        return 0
    stale = [p for p in output_dir.iterdir() if p.is_dir() and re.match(r"^\.checkpoint-\d+\.tmp-", p.name)]
    for path in stale:
        shutil.rmtree(path)
    return len(stale)


def resolve_resume(output_dir: Path, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from: ``True`` means the latest in output_dir, a string names one."""
    if resume in (None, False):
        return None
    if resume is True:
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint: {path} is not a complete kimitune checkpoint (no {STATE_FILE})"
        )
    return path


def load_training_state(
    checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> TrainerState:
    """Restores optimizer and RNG state from ``checkpoint``; returns its TrainerState.

    The RNG state is this rank's; a rank the checkpoint has none for (it was written by fewer processes) keeps
    the generators it has.
    """
    if not (checkpoint / "optimizer").is_dir():
        older = (checkpoint / "optimizer.pt").is_file()
        raise FileNotFoundError(
            f"resume_from_checkpoint: {checkpoint} has no optimizer state (optimizer/)"
            + (": it was written by an older kimitune (optimizer.pt), whose single-file format this version no "
               "longer reads; start a new run from its weights instead (base_model for a full model, "
               "lora_model_dir for an adapter)" if older else "")
        )
    load_optimizer(checkpoint / "optimizer", model, optimizer)
    plain, tensors = checkpoint / _rng_file(rank, "json"), checkpoint / _rng_file(rank, "safetensors")
    if plain.is_file():
        set_rng_state(json.loads(plain.read_text()), load_file(tensors))
    return TrainerState.from_json((checkpoint / STATE_FILE).read_text())
