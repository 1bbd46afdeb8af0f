"""What a Kimi Linear architecture costs: layer pattern, total and active parameters, weight memory.

Counts are read from the model itself, built on the meta device (``meta_model``: shapes only, no memory, no
weights drawn): ``weights(model)`` lists every parameter with its shape and kind, and ``kimitune.plan`` reads the
same list, so the shapes are derived once, by the modules that hold them. The router's ``e_score_correction_bias``
is a buffer, as in transformers, and not counted. Active parameters are those one token uses: everything except
the routed experts it is not sent to (``num_experts_per_token`` of ``num_experts``; shared experts always run), and
of the input embedding table only its own row.

Weight memory: bf16 is 2 bytes per parameter. For 8-bit and 4-bit, the projection matrices (every ``nn.Linear`` but
the LM head, and the routed experts' stacks: what ``kimitune.quant`` quantises) take 1 or 0.5 byte per parameter,
plus a float32 scale per 64 weights at 4-bit (bitsandbytes NF4 without double quantisation); embeddings, the LM
head, norms, the short conv, the forget-gate vectors and the router stay in bf16, as bitsandbytes leaves them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from kimitune.model.configuration import PRESETS, KimiLinearConfig
from kimitune.model.kda import KimiDeltaAttention
from kimitune.model.modeling import KimiLinearForCausalLM
from kimitune.model.moe import GroupedExperts, KimiLinearMoE

_GB = 1e9

WeightKind = Literal["embedding", "lm_head", "projection", "experts", "other"]


@dataclass(frozen=True)
class Weight:
    """One parameter: full name, decoder layer (None outside the layers), shape and kind.

    kind: 'embedding' (the input table [V, C]), 'lm_head' ([V, C]), 'projection' (an ``nn.Linear`` weight [out, in]
    in a decoder layer), 'experts' (a routed-expert stack [E, out, in]), 'other' (norms, the short conv, the forget
    gate's vectors, the router).
    """

    name: str
    layer: int | None
    shape: tuple[int, ...]
    kind: WeightKind

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def quantizable(self) -> bool:
        """Whether ``load_in_8bit`` / ``load_in_4bit`` store it quantised."""
        return self.kind in ("projection", "experts")

    @property
    def rows(self) -> int:
        """Its rows [..., out, :] (a quantised matrix keeps one int8 scale per row)."""
        return self.numel // self.shape[-1]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def meta_model(config: KimiLinearConfig) -> KimiLinearForCausalLM:
    """``KimiLinearForCausalLM(config)`` on the meta device: every module and shape, no memory."""
    with torch.device("meta"):
        return KimiLinearForCausalLM(config)


def weights(model: KimiLinearForCausalLM) -> tuple[Weight, ...]:
    """Every parameter of an un-adapted model, in ``named_parameters`` order."""
    layer_of = {id(m): i for i, layer in enumerate(model.model.layers) for m in layer.modules()}
    kind_of: dict[int, WeightKind] = {id(model.model.embed_tokens.weight): "embedding",
                                      id(model.lm_head.weight): "lm_head"}
    for module in model.model.layers.modules():
        if isinstance(module, nn.Linear):
            kind_of[id(module.weight)] = "projection"
        elif isinstance(module, GroupedExperts):
            kind_of.update({id(p): "experts" for p in module.parameters(recurse=False)})
    found = []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            found.append(Weight(name, layer_of.get(id(module)), tuple(param.shape), kind_of.get(id(param), "other")))
    return tuple(found)


@dataclass(frozen=True)
class LayerSummary:
    """One decoder layer: attention kind ('KDA' / 'MLA'), feed-forward kind ('dense' / 'MoE') and its counts."""

    index: int
    attention: str
    feed_forward: str
    params: int
    active_params: int


@dataclass(frozen=True)
class ModelSummary:
    """Parameter counts and weight memory (bytes) of one architecture."""

    config: KimiLinearConfig
    layers: list[LayerSummary]
    total_params: int
    active_params: int
    quantizable_params: int  # the projection matrices that 8-bit / 4-bit loading quantises
    weight_bytes: dict[str, float]

    @property
    def layer_pattern(self) -> str:
        """e.g. 'KDA KDA KDA MLA ...' in layer order."""
        return " ".join(layer.attention for layer in self.layers)

    def __rich__(self) -> Table:
        table = Table(title="Kimi Linear model", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for key, value in self.rows():
            table.add_row(key, value)
        return table

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for printing."""
        config = self.config
        kda = [layer.index + 1 for layer in self.layers if layer.attention == "KDA"]
        mla = [layer.index + 1 for layer in self.layers if layer.attention == "MLA"]
        dense = [layer.index + 1 for layer in self.layers if layer.feed_forward == "dense"]
        return [
            ("layers", f"{len(self.layers)}: {len(kda)} KDA, {len(mla)} MLA at {_join(mla)} (counting from 1)"),
            ("pattern", self.layer_pattern),
            ("feed-forward", f"dense MLP in layers {_join(dense) or 'none'}, MoE elsewhere: "
                             f"{config.num_experts} experts, top-{config.num_experts_per_token}, "
                             f"{config.num_shared_experts} shared"),
            ("hidden / vocab", f"{config.hidden_size} / {config.vocab_size}"),
            ("total parameters", _count(self.total_params)),
            ("active parameters", f"{_count(self.active_params)} per token"),
            ("weights in bf16", _size(self.weight_bytes["bf16"])),
            ("weights in 8-bit", _size(self.weight_bytes["int8"])),
            ("weights in 4-bit", _size(self.weight_bytes["int4"])),
        ]

    def __str__(self) -> str:
        width = max(len(key) for key, _ in self.rows())
        return "\n".join(f"{key:<{width}}  {value}" for key, value in self.rows())


def format_count(n: float, digits: int = 2) -> str:
    """A count with the largest unit it reaches: '49.12B', '1.35M', '12.29K', '512'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:,.0f}"


def _count(n: int) -> str:
    return f"{format_count(n)} ({n:,})" if n >= 1e3 else f"{n:,}"


def _size(nbytes: float) -> str:
    return f"{nbytes / _GB:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def _join(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)


def _read_config(config: KimiLinearConfig | str | Path) -> KimiLinearConfig:
    if isinstance(config, str) and config in PRESETS and not Path(config).exists():
        return KimiLinearConfig.preset(config)
    if not isinstance(config, KimiLinearConfig):
        return KimiLinearConfig.from_pretrained(config)
    return config


def _layer_summaries(model: KimiLinearForCausalLM, table: tuple[Weight, ...]) -> list[LayerSummary]:
    layers = []
    for i, layer in enumerate(model.model.layers):
        own = [w for w in table if w.layer == i]
        params = sum(w.numel for w in own)
        moe = isinstance(layer.mlp, KimiLinearMoE)
        routed = sum(w.numel for w in own if w.kind == "experts")
        # a token runs top_k of the routed experts (the shared ones always)
        unused = routed - routed * layer.mlp.top_k // layer.mlp.num_experts if moe else 0
        layers.append(LayerSummary(i, "KDA" if isinstance(layer.self_attn, KimiDeltaAttention) else "MLA",
                                   "MoE" if moe else "dense", params, params - unused))
    return layers


_SUMMARIES: dict[str, tuple[tuple[Weight, ...], list[LayerSummary]]] = {}


def summarize(config: KimiLinearConfig | str | Path) -> ModelSummary:
    """Summary of a config, a model folder (its config.json), a config .json file or a preset name ('tiny')."""
    config = _read_config(config)
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _SUMMARIES:  # one meta model per architecture
        model = meta_model(config)
        table = weights(model)
        _SUMMARIES[key] = table, _layer_summaries(model, table)
    table, layers = _SUMMARIES[key]
    total = sum(w.numel for w in table)
    embedding = next(w for w in table if w.kind == "embedding")
    unused = sum(layer.params - layer.active_params for layer in layers)
    active = total - embedding.numel + embedding.shape[1] - unused  # of the table, a token reads its own row
    quantizable = sum(w.numel for w in table if w.quantizable)
    kept = total - quantizable
    weight_bytes = {
        "bf16": 2.0 * total,
        "int8": 2.0 * kept + quantizable,
        "int4": 2.0 * kept + quantizable * (0.5 + 4 / 64),
    }
    return ModelSummary(config, list(layers), total, active, quantizable, weight_bytes)


def print_summary(config: KimiLinearConfig | str | Path, console: Console) -> None:
    """Prints ``summarize(config)`` (``kimitune inspect``)."""
    console.print(summarize(config))
