"""Merge a LoRA adapter into a release-layout checkpoint, one shard at a time: ``kimitune merge-lora``.

    merge_lora_checkpoint(base_dir, adapter_dir, out_dir)

The adapter names in-memory (transformers') tensors; the shards hold release-named file tensors. The one mapping
table of ``kimitune.model.checkpoint`` (``checkpoint_layout``) says which file tensor is which slice of which
in-memory tensor, so each file tensor that is part of an adapted weight gets exactly its slice of ``s B A``: a
whole linear weight, or one expert's ``w1``/``w3`` rows of ``gate_up_proj`` and ``w2`` of ``down_proj`` (one expert's
delta at a time, never the whole [E, out, in] stack). The sum is formed in float32 and rounded once to the file's
dtype, as ``kimitune.adapters.merge_lora`` does in memory.

Host memory: the adapter plus one base shard, read into one buffer that is freed once the shard is written
(benchmarks/merge_memory.py measures it). The output has the base's shard files (same file names and tensors,
under release names), the index, and the base folder's other model files copied (config.json, generation config,
tokenizer files, chat template, remote code, license): the layout that transformers' ``KimiLinearForCausalLM`` and
vLLM load. Nothing else is copied: a base that is a training run's output_dir also holds its metrics.jsonl, loss
curve and run records, which describe that run, not the merged model (``MODEL_FILES``).

The adapter is checked against the base model's config before anything is written, by the same checks as
loading it into a model (``kimitune.adapters.load_adapter`` on a model built on the meta device), so a tensor
that does not fit is named with the reason (shape, rank, target).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kimitune.adapters import AdapterFile, load_adapter, read_adapter
from kimitune.adapters.layers import fold_into
from kimitune.model import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.model.checkpoint import INDEX_FILE, checkpoint_layout, open_checkpoint_files, resolve_file_names
from kimitune.model.safetensors_io import SafetensorsReader, write_safetensors

# The files of a model folder besides its weights, as the hub's model repos and transformers' save_pretrained name
# them (tokenizers: fast, sentencepiece, BPE, tiktoken; remote code is *.py).
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "tiktoken.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "*.py", "LICENSE*",
)


def is_model_file(name: str) -> bool:
    """Whether a base folder's file (not a weight file) belongs in the merged model's folder."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES)


class MergeError(ValueError):
    """A merge that cannot run as asked (folders); the message says which folder and why."""


@dataclass(frozen=True)
class MergeTarget:
    """A file tensor that is (part of) an adapted weight: the adapted name and the slice of it the file holds."""

    adapted: str
    index: tuple


@dataclass
class MergeReport:
    """What a merge wrote: the folder, its shard files, the file tensors changed and all tensor bytes."""

    out_dir: Path
    shards: list[str]
    merged_tensors: int
    total_bytes: int


def _part_delta(adapter: AdapterFile, name: str, index: tuple) -> torch.Tensor:
    """``s B A`` of adapted ``name`` at ``index`` (float32): for experts, one expert's [out, in] rows only."""
    lora_a, lora_b = adapter.tensors[name]
    if lora_a.ndim == 3:
        expert, rows = index[0], index[1:]
        return (lora_b[expert].float()[rows] @ lora_a[expert].float()) * adapter.settings.scaling
    return ((lora_b.float() @ lora_a.float()) * adapter.settings.scaling)[index]


def _read_shard(reader: SafetensorsReader, names: list[str]) -> list[torch.Tensor]:
    """The tensors ``names`` of one shard, as views into one buffer: a single allocation of the shard's size,
    returned to the system when the views go (many separate tensors would leave the heap fragmented)."""
    offsets, size = [], 0
    for name in names:
        size += -size % 16  # every view starts aligned for any dtype
        offsets.append(size)
        size += reader.tensors[name].end - reader.tensors[name].start
    buffer = torch.empty(size, dtype=torch.uint8)
    tensors = []
    for name, offset in zip(names, offsets):
        info = reader.tensors[name]
        tensor = buffer[offset : offset + info.end - info.start].view(info.dtype).view(info.shape)
        reader.read_into(name, tensor)
        tensors.append(tensor)
    return tensors


def _merge_shard(
    reader: SafetensorsReader,
    names: list[str],
    adapter: AdapterFile,
    targets: dict[str, MergeTarget],
    release: dict[str, str],
    path: Path,
) -> tuple[int, int]:
    """Reads one shard, adds the deltas of its adapted tensors, writes it to ``path`` under release names ->
    (bytes written, tensors changed). The shard's buffer is freed on return."""
    tensors = _read_shard(reader, names)
    changed = 0
    for name, tensor in zip(names, tensors):
        target = targets.get(name)
        if target is not None:
            fold_into(tensor, _part_delta(adapter, target.adapted, target.index))
            changed += 1
    return write_safetensors(path, [(release[n], t) for n, t in zip(names, tensors)]), changed


def _check_folders(base: Path, adapter: Path, out: Path) -> None:
    if not base.is_dir():
        raise FileNotFoundError(f"no base model folder at {base}")
    if not adapter.is_dir():
        raise FileNotFoundError(f"no adapter folder at {adapter}")
    resolved = out.resolve()
    if resolved in (base.resolve(), adapter.resolve()):
        raise MergeError(f"--out {out} is the base or the adapter folder: write the merged model somewhere else")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not an empty folder: choose a new one")


def _plan(base: Path, adapter_dir: Path):
    """Checks base and adapter; -> (adapter, readers by file tensor name, release name and merge target of each
    file tensor)."""
    config = KimiLinearConfig.from_pretrained(base)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    layouts = checkpoint_layout(model)
    shapes = {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()}
    load_adapter(model, adapter_dir)  # on the meta device: only the checks (names, shapes, rank) do anything
    adapter = read_adapter(adapter_dir)
    files = open_checkpoint_files(base)
    chosen = resolve_file_names(layouts, files, base)
    adapted = {adapter.parameter_name(name): name for name in adapter.tensors}
    release, targets, wrong = {}, {}, []
    for layout in layouts:
        for part in layout.parts:
            file_name = chosen[part.names[0]]
            release[file_name] = part.names[0]
            expected = tuple(torch.empty(shapes[layout.name], device="meta")[part.index].shape)
            found = files[file_name].tensors[file_name].shape
            if found != expected:
                wrong.append(f"{file_name} is {list(found)}, expected {list(expected)}")
            if layout.name in adapted:
                targets[file_name] = MergeTarget(adapted[layout.name], part.index)
    if wrong:
        raise MergeError(f"{base}: tensor(s) with the wrong shape for its config.json: {'; '.join(wrong[:12])}")
    return adapter, files, release, targets


def merge_lora_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> MergeReport:
    """Writes ``base_dir``'s checkpoint with ``adapter_dir``'s LoRA merged in to ``out_dir`` (see the module doc)."""
    base, adapter_path, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    _check_folders(base, adapter_path, out)
    adapter, files, release, targets = _plan(base, adapter_path)
    out.mkdir(parents=True, exist_ok=True)
    by_shard: dict[Path, list[str]] = {}
    for name, reader in files.items():
        by_shard.setdefault(reader.path, []).append(name)
    weight_map, total, merged = {}, 0, 0
    for path in sorted(by_shard):
        reader = files[by_shard[path][0]]
        names = sorted(by_shard[path], key=lambda n: reader.tensors[n].start)
        written, changed = _merge_shard(reader, names, adapter, targets, release, out / path.name)
        total += written
        merged += changed
        weight_map.update({release[name]: path.name for name in names})
    shards = sorted({p.name for p in by_shard})
    if (base / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for file in base.iterdir():
        if file.is_file() and is_model_file(file.name):
            shutil.copy2(file, out / file.name)
    return MergeReport(out, shards, merged, total)
