"""Which tensor each linear of the decoder layers reads, traced from the model's own forward.

Linears that read one tensor keep it alive once between them when they are adapted (LoRA keeps its input for the
low-rank gradient): a KDA layer's q, k, v, beta, forget-gate f_a and output-gate g_a projections read its normed
input, MLA's query and latent projections theirs, a SwiGLU's gate and up projections theirs. The model computes
those together (``project_shared_input``); here the grouping is read off a forward instead of being written down
a second time: every ``nn.Linear`` records the tensor it is called with, and linears whose inputs share a storage
read one tensor. The routed experts' modules record how many rows they get per token (``top_k`` copies).

The forward runs on a narrow copy of the architecture on the CPU (``narrow``: the same layers, experts and routing,
every width 8): the meta device cannot run a forward (the short conv and the experts' grouped products read
values), and widths do not change which module reads which tensor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.modeling import KimiLinearForCausalLM
from kimitune.model.moe import GroupedExperts

_WIDTH = 8  # every width of the traced copy; a multiple of 4 keeps the grouped products on torch._grouped_mm
_TOKENS = 4
_WIDTH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "kda_num_heads", "kda_head_dim",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "moe_intermediate_size")


@dataclass(frozen=True)
class Dataflow:
    """readers: each decoder-layer linear's name -> the names of every linear that reads the same tensor (itself
    included). block_readers: the linears that read their block's input (the attention's or the feed-forward's
    normed hidden states). rows_per_token: each routed-experts module's name -> the rows it computes per token
    (top_k)."""

    readers: dict[str, frozenset[str]]
    block_readers: frozenset[str]
    rows_per_token: dict[str, int]


def narrow(config: KimiLinearConfig) -> KimiLinearConfig:
    """``config`` with every width ``_WIDTH`` (a low-rank query projection stays low-rank): the same modules."""
    widths = {name: _WIDTH for name in _WIDTH_FIELDS}
    if config.q_lora_rank is not None:
        widths["q_lora_rank"] = _WIDTH
    return dataclasses.replace(config, **widths)


_TRACES: dict[str, Dataflow] = {}


def dataflow(config: KimiLinearConfig) -> Dataflow:
    """The traced dataflow of ``config``'s decoder layers (once per architecture)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _TRACES:
        _TRACES[key] = _trace(narrow(config))
    return _TRACES[key]


@torch.no_grad()
def _trace(config: KimiLinearConfig) -> Dataflow:
    with torch.random.fork_rng(devices=[]):  # the copy's random weights leave the caller's random state as it was
        model = KimiLinearForCausalLM(config)
    inputs: dict[str, torch.Tensor] = {}  # held until the end, so that no storage is freed and reused
    rows: dict[str, int] = {}

    def record_input(name: str, module: nn.Module, args: tuple) -> None:
        inputs[name] = args[0]

    def expert_rows(name: str, module: nn.Module, args: tuple) -> None:
        rows[name] = args[0].shape[0] // _TOKENS

    block_of: dict[str, str] = {}  # linear -> its block (a decoder layer's self_attn or mlp)
    for i, layer in enumerate(model.model.layers):
        for block_name in ("self_attn", "mlp"):
            block_name = f"model.layers.{i}.{block_name}"
            block = model.get_submodule(block_name)
            block.register_forward_pre_hook(partial(record_input, block_name))
            for name, module in block.named_modules(prefix=block_name):
                if isinstance(module, nn.Linear):
                    module.register_forward_pre_hook(partial(record_input, name))
                    block_of[name] = block_name
                elif isinstance(module, GroupedExperts):
                    module.register_forward_pre_hook(partial(expert_rows, name))
    model.model(torch.zeros(1, _TOKENS, dtype=torch.long))

    def storage(name: str) -> int:
        return inputs[name].untyped_storage().data_ptr()

    by_storage: dict[int, set[str]] = {}
    for name in block_of:
        by_storage.setdefault(storage(name), set()).add(name)
    readers = {name: frozenset(group) for group in by_storage.values() for name in group}
    block_readers = frozenset(name for name, block in block_of.items() if storage(name) == storage(block))
    return Dataflow(readers, block_readers, rows)
