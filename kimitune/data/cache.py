"""The preprocessing cache: tokenised samples on disk, keyed by everything that decides them.

Location: ``dataset_prepared_path`` when set, else ``$XDG_CACHE_HOME/kimitune/prepared`` (``~/.cache/kimitune/prepared``
when XDG_CACHE_HOME is unset). Each preparation is a folder named by a 16-hex-digit key, the SHA-256 of: the cache
format, the data (file contents, or size + mtime for files over 256 MiB; a hub dataset's own fingerprint), every
dataset entry's settings, the tokenizer (its full serialisation, or its vocabulary for slow tokenizers, and its
special tokens), the chat template, and the settings that change tokenisation or the split (``sequence_len``,
``excess_length_strategy``, ``train_on_inputs``, ``roles_to_train``, ``train_on_eos``, ``val_set_size``, ``seed``,
``shuffle_merged_datasets``). ``key.json`` in the folder holds those parts, readable.

A folder holds, per split, ``{split}_input_ids.npy`` and ``{split}_labels.npy`` (int32, all samples end to end) and
``{split}_offsets.npy`` (int64 ``[n+1]``), for KTO data ``{split}_desirable.npy`` (bool ``[n]``), plus ``report.json``. Folders are written under a temporary name and
renamed into place, so a reader never sees half a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kimitune.config import TrainConfig
from kimitune.data.packing import Sample
from kimitune.data.report import DataReport
from kimitune.data.sources import Source

# Bump whenever the samples or the report for the same inputs would change (3: rows and lines counted from 1).
CACHE_FORMAT = 3


def cache_root(config: TrainConfig) -> Path:
    if config.dataset_prepared_path is not None:
        return Path(config.dataset_prepared_path).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "kimitune" / "prepared"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides the tokenizer's output: its serialisation (fast) or vocabulary (slow), its special
    tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "model": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def key_parts(
    config: TrainConfig, tokenizer: Any, train_sources: Sequence[Source], eval_sources: Sequence[Source]
) -> dict[str, Any]:
    def entry(source: Source) -> dict[str, Any]:
        return {"settings": source.config.model_dump(), "data": source.fingerprint()}

    return {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "datasets": [entry(s) for s in train_sources],
        "test_datasets": [entry(s) for s in eval_sources],
        "settings": config.model_dump(
            include={
                "sequence_len", "excess_length_strategy", "train_on_inputs", "roles_to_train", "train_on_eos",
                "val_set_size", "seed", "shuffle_merged_datasets", "rl",
            }
        ),
    }


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_split(directory: Path, split: str, samples: Sequence[Sample]) -> None:
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in samples])
    for field in ("input_ids", "labels"):
        values = np.concatenate([getattr(s, field) for s in samples]) if samples else np.zeros(0)
        np.save(directory / f"{split}_{field}.npy", values.astype(np.int32))
    np.save(directory / f"{split}_offsets.npy", offsets)


def _load_split(directory: Path, split: str) -> list[Sample]:
    input_ids = np.load(directory / f"{split}_input_ids.npy", mmap_mode="r")
    labels = np.load(directory / f"{split}_labels.npy", mmap_mode="r")
    offsets = np.load(directory / f"{split}_offsets.npy")
    return [Sample(input_ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def save(
    directory: Path, parts: dict[str, Any], train: Sequence[Sample], eval: Sequence[Sample], report: DataReport,
    desirable: dict[str, Sequence[bool]] | None = None,
) -> None:
    """Writes one preparation to ``directory`` atomically (a concurrent writer of the same key may win);
    ``desirable``: KTO's labels per split ("train", "eval"), one per sample."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _save_split(staging, "train", train)
    _save_split(staging, "eval", eval)
    for split, flags in (desirable or {}).items():
        np.save(staging / f"{split}_desirable.npy", np.asarray(flags, dtype=bool))
    (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    (staging / "key.json").write_text(json.dumps(parts, indent=1, sort_keys=True, default=str))
    try:
        staging.rename(directory)
    except OSError:  # another process finished the same key first; its folder holds the same samples
        shutil.rmtree(staging, ignore_errors=True)


def load(directory: Path) -> tuple[list[Sample], list[Sample], DataReport, dict[str, list[bool]] | None] | None:
    """The preparation in ``directory`` (train, eval, report, KTO's labels per split or None), or None when there
    is none."""
    if not (directory / "report.json").is_file():
        return None
    report = DataReport.from_dict(json.loads((directory / "report.json").read_text()))
    desirable = None
    if (directory / "train_desirable.npy").is_file():
        desirable = {split: np.load(directory / f"{split}_desirable.npy").tolist() for split in ("train", "eval")}
    return _load_split(directory, "train"), _load_split(directory, "eval"), report, desirable
