"""Release-layout checkpoints in and out: ONE table maps in-memory tensors to the release file's tensors.

Each in-memory tensor (transformers' names) is made of one or more file tensors (the release's names), each
lying at an index inside it. Loading copies every file tensor into its place; saving slices it back out:

    in memory                                        release file
    self_attn.conv1d.weight [3D, 1, W]               self_attn.{q,k,v}_conv1d.weight      rows [0:D], [D:2D], [2D:3D]
    self_attn.forget_gate.{f_a_proj,f_b_proj}.weight self_attn.{f_a_proj,f_b_proj}.weight
    self_attn.forget_gate.{A_log,dt_bias}            self_attn.{A_log,dt_bias}
    mlp.experts.gate_up_proj [E, 2I, C]              block_sparse_moe.experts.{e}.w1.weight [e, 0:I], .w3 [e, I:2I]
    mlp.experts.down_proj [E, C, I]                  block_sparse_moe.experts.{e}.w2.weight [e]
    mlp.{gate,shared_experts}.* (MoE layers)         block_sparse_moe.{gate,shared_experts}.*
    mlp.{gate,up,down}_proj.weight (dense layers)    mlp.* (written), or block_sparse_moe.* (accepted: transformers)
    everything else                                  the same name

Loading builds the model on the meta device and fills it tensor by tensor, straight into the target dtype and
device, so host memory holds the model (when loading to the CPU) plus one file tensor. Only safetensors are
read, and no code from the folder is ever run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.modeling import KimiLinearForCausalLM
from kimitune.model.safetensors_io import SafetensorsReader, write_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the folder and the tensors."""


@dataclass(frozen=True)
class FilePart:
    """A file tensor: its release name first, then other names accepted on load; where it lies in memory."""

    names: tuple[str, ...]
    index: tuple


@dataclass(frozen=True)
class TensorLayout:
    """An in-memory tensor (transformers' name) and the file tensors it is made of."""

    name: str
    parts: tuple[FilePart, ...]


def _whole(*names: str) -> tuple[FilePart, ...]:
    return (FilePart(names, ()),)


def _conv(m: re.Match, shape: torch.Size) -> tuple[FilePart, ...]:
    width = shape[0] // 3
    return tuple(FilePart((f"{m[1]}.{p}_conv1d.weight",), (slice(i * width, (i + 1) * width),))
                 for i, p in enumerate("qkv"))


def _gate_up(m: re.Match, shape: torch.Size) -> tuple[FilePart, ...]:
    experts, inner = shape[0], shape[1] // 2
    prefix = f"{m[1]}.block_sparse_moe.experts"
    return tuple(part for e in range(experts) for part in (
        FilePart((f"{prefix}.{e}.w1.weight",), (e, slice(0, inner))),
        FilePart((f"{prefix}.{e}.w3.weight",), (e, slice(inner, 2 * inner))),
    ))


def _down(m: re.Match, shape: torch.Size) -> tuple[FilePart, ...]:
    return tuple(FilePart((f"{m[1]}.block_sparse_moe.experts.{e}.w2.weight",), (e,)) for e in range(shape[0]))


# THE table: (pattern on the in-memory name, its file parts). Names that match no pattern are stored as they are.
_LAYOUT_RULES: list[tuple[re.Pattern, Callable[[re.Match, torch.Size], tuple[FilePart, ...]]]] = [
    (re.compile(r"^(model\.layers\.\d+\.self_attn)\.conv1d\.weight$"), _conv),
    (re.compile(r"^(model\.layers\.\d+\.self_attn)\.forget_gate\.(f_a_proj\.weight|f_b_proj\.weight|A_log|dt_bias)$"),
     lambda m, shape: _whole(f"{m[1]}.{m[2]}")),
    (re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.gate_up_proj$"), _gate_up),
    (re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.down_proj$"), _down),
    (re.compile(r"^(model\.layers\.\d+)\.mlp\.((?:gate|shared_experts)\..+)$"),
     lambda m, shape: _whole(f"{m[1]}.block_sparse_moe.{m[2]}")),
    (re.compile(r"^(model\.layers\.\d+)\.mlp\.((?:gate|up|down)_proj\.weight)$"),
     lambda m, shape: _whole(f"{m[1]}.mlp.{m[2]}", f"{m[1]}.block_sparse_moe.{m[2]}")),
]


def tensor_layout(name: str, shape: torch.Size) -> TensorLayout:
    """The file tensors that make up in-memory tensor ``name`` of ``shape``."""
    for pattern, parts in _LAYOUT_RULES:
        match = pattern.match(name)
        if match:
            return TensorLayout(name, parts(match, shape))
    return TensorLayout(name, _whole(name))


def checkpoint_layout(model: nn.Module) -> list[TensorLayout]:
    """The layout of every parameter and persistent buffer of ``model`` (works on the meta device too)."""
    return [tensor_layout(name, tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()]


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def open_checkpoint_files(folder: Path) -> dict[str, SafetensorsReader]:
    """file tensor name -> the reader of the shard that holds it."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_file}: not a safetensors index ({err!r})") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_file} names shard file(s) that are not in {folder}: {_listing(missing)}")
        readers = {s: SafetensorsReader(folder / s) for s in shard_names}
        absent = [n for n, s in weight_map.items() if n not in readers[s].tensors]
        if absent:
            raise CheckpointError(f"{index_file} lists tensor(s) that their shard does not hold: {_listing(absent)}")
        return {name: readers[shard] for name, shard in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        reader = SafetensorsReader(single)
        return {name: reader for name in reader.tensors}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise CheckpointError(f"{folder} holds only pickle checkpoints (.bin/.pt); kimitune reads safetensors only")
    raise CheckpointError(f"{folder} has no {INDEX_FILE} or {SINGLE_FILE}")


def resolve_file_names(
    layouts: list[TensorLayout], files: dict[str, SafetensorsReader], folder: Path
) -> dict[str, str]:
    """Release name of each part -> the name it is read under; raises on missing or unexpected tensors."""
    chosen, missing = {}, []
    for layout in layouts:
        for part in layout.parts:
            found = next((n for n in part.names if n in files), None)
            if found is None:
                missing.append(part.names[0])
            else:
                chosen[part.names[0]] = found
    unexpected = sorted(set(files) - set(chosen.values()))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{folder} does not match its config.json: " + "; ".join(problems))
    return chosen


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = tensor


def _decoder_layer(layout: TensorLayout) -> int | None:
    """The decoder layer an in-memory tensor belongs to (None for embeddings, the final norm and the head)."""
    match = re.match(r"^model\.layers\.(\d+)\.", layout.name)
    return int(match[1]) if match else None


@dataclass
class CheckedCheckpoint:
    """A release-layout folder whose tensor headers match its config: the config, the readers by file tensor name,
    the model built on the meta device, its layout and the file name chosen for each tensor part."""

    config: KimiLinearConfig
    files: dict[str, SafetensorsReader]
    model: KimiLinearForCausalLM
    layouts: list
    chosen: dict[str, str]


def open_checked(folder: Path) -> CheckedCheckpoint:
    """Reads ``folder``'s config.json and safetensors headers (no tensor data) and checks that every tensor its
    config's model needs is there with its shape; raises FileNotFoundError or ``CheckpointError`` naming the file."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder} (kimitune reads local folders in the release layout: "
                                "config.json and safetensors)")
    config = KimiLinearConfig.from_pretrained(folder)
    files = open_checkpoint_files(folder)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    layouts = checkpoint_layout(model)
    chosen = resolve_file_names(layouts, files, folder)
    shapes = model.state_dict(keep_vars=True)
    wrong = []
    for layout in layouts:
        for part in layout.parts:
            name = chosen[part.names[0]]
            expected = tuple(shapes[layout.name][part.index].shape)
            found = files[name].tensors[name].shape
            if found != expected:
                wrong.append(f"{name} in {files[name].path.name} is {list(found)}, expected {list(expected)}")
    if wrong:
        raise CheckpointError(f"{folder}: {len(wrong)} tensor(s) with the wrong shape for its config.json: "
                              f"{_listing(wrong)}")
    return CheckedCheckpoint(config, files, model, layouts, chosen)


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    on_layer_loaded: Callable[[nn.Module], None] | None = None,
) -> KimiLinearForCausalLM:
    """A release-layout folder -> KimiLinearForCausalLM on ``device`` (CPU by default), every tensor in ``dtype``
    (by default the dtype it has in the file).

    ``on_layer_loaded(decoder_layer)`` runs on each decoder layer as soon as its tensors are in, before the next
    layer is read: ``kimitune.quant.load_quantized`` quantises there, so the device holds the quantised layers so
    far plus one layer in ``dtype``, never the whole model in ``dtype``."""
    checked = open_checked(Path(path))
    config, files, model, layouts, chosen = (checked.config, checked.files, checked.model, checked.layouts,
                                             checked.chosen)
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    device = torch.device(device or "cpu")
    meta = model.state_dict(keep_vars=True)
    # state_dict order: every decoder layer's tensors are contiguous, so a layer is complete when the next starts.
    for layer, layer_layouts in itertools.groupby(layouts, key=_decoder_layer):
        for layout in layer_layouts:
            first = chosen[layout.parts[0].names[0]]
            target = torch.empty(meta[layout.name].shape, dtype=dtype or files[first].tensors[first].dtype,
                                 device=device)
            for part in layout.parts:
                name = chosen[part.names[0]]
                files[name].read_into(name, target[part.index])
            _set_tensor(model, layout.name, target)
            del target
        if on_layer_loaded is not None and layer is not None:
            on_layer_loaded(model.model.layers[layer])
    return model


def _parse_size(size: int | str) -> int:
    """5_000_000_000, "5GB" (10^9) or "5GiB" (2^30) -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB' / '500MB' / '2GiB', got {size!r}")
    unit = match[2].upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match[1]) * base ** " KMGT".index(unit[0] if unit[0] != "B" else " "))


def _weights_held_as_modules(model: nn.Module) -> bool:
    """Whether a frozen weight is held as a module that dequantises, not a tensor (kimitune.quant's weights)."""
    return any(callable(getattr(module, "dequantize", None)) for module in model.modules())


def save_pretrained(
    model: KimiLinearForCausalLM,
    directory: str | Path,
    max_shard_size: int | str = "5GB",
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes config.json and the release-layout safetensors (one file, or shards + index) to ``directory``.

    ``state``: the tensors to write by in-memory name, when not the model's own (a sharded model's gathered state).
    """
    if _weights_held_as_modules(model):
        raise ValueError("save_pretrained: the model's frozen weights are quantised (load_in_8bit / load_in_4bit); "
                         "kimitune writes release checkpoints from float weights only (save the adapter instead)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    state = model.state_dict() if state is None else state
    entries = [(part.names[0], state[layout.name][part.index])
               for layout in checkpoint_layout(model) for part in layout.parts]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    shard_bytes = 0
    for name, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, tensor))
        shard_bytes += nbytes
    if len(shards) == 1:
        file_names = [SINGLE_FILE]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(write_safetensors(directory / file, shard) for file, shard in zip(file_names, shards))
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(file_names, shards) for name, _ in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _remove_stale_weights(directory, set(file_names) | ({INDEX_FILE} if len(shards) > 1 else set()))
    saved_dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    dataclasses.replace(model.config, dtype=saved_dtype).save_pretrained(directory)
    return directory


def _remove_stale_weights(directory: Path, written: set[str]) -> None:
    """Deletes weight files of an earlier save that this one did not write (they would shadow or confuse it)."""
    for file in directory.iterdir():
        ours = file.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_PATTERN.match(file.name)
        if ours and file.name not in written:
            file.unlink()
