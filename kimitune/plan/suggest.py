"""What would make a run fit: changes of one or two settings, each planned again, the least drastic first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kimitune.config import TrainConfig
from kimitune.model.configuration import KimiLinearConfig
from kimitune.plan.parts import MemoryPlan
from kimitune.plan.predict import recomputed_layers, predict_peak_memory

GPUS = "gpus"  # a change's key for more processes (FSDP2 through torchrun), not a config key


@dataclass
class Suggestion:
    change: dict[str, Any]  # config keys -> values, and possibly GPUS -> a GPU count
    plan: MemoryPlan

    @property
    def text(self) -> str:
        return ", ".join(f"{v} GPUs (torchrun --nproc_per_node {v})" if k == GPUS else f"{k}: {_yaml(v)}"
                         for k, v in self.change.items())


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return str(value)


def _candidates(train: TrainConfig, model_config: KimiLinearConfig, gpu_bytes: float, gpus: int,
                host_bytes: float | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Changes to try, in order: the config's own settings from the cheapest in speed, then pairs with gradient
    checkpointing, then more GPUs, then (long rows) each row split across the GPUs (context_parallel_size)."""
    candidates: list[dict[str, Any]] = []
    layers = model_config.num_hidden_layers
    if train.kda_keep_intermediates:  # the cheapest memory to give back (benchmarks/RESULTS.md has its speed)
        candidates.append({"kda_keep_intermediates": False})
    recomputing = len(recomputed_layers(train, layers, gpus))
    for count in range(recomputing + 1, layers):  # recompute as few layers as fit: the smallest slow-down
        change = {"gradient_checkpointing": True, "gradient_checkpointing_layers": count}
        plan = predict_peak_memory(train.model_copy(update=change), model_config, gpus=gpus, **kwargs)
        if plan.fits(gpu_bytes, host_bytes):
            candidates.append(change)
            break
    if recomputing < layers:
        every_layer: dict[str, Any] = {"gradient_checkpointing": True}
        if train.gradient_checkpointing_layers is not None:
            every_layer["gradient_checkpointing_layers"] = None
        candidates.append(every_layer)
    rows = train.micro_batch_size * train.sequence_len
    if rows > 4096:
        pieced = _long_row_change(train, model_config, gpu_bytes, gpus, rows, host_bytes, **kwargs)
        if pieced is not None:
            candidates.append(pieced)
    # one more forward of each feed-forward block, its activations a shard at a time; shards of ~hidden_size tokens
    # starve the experts' GEMMs (it halved a DPO step's speed on the 48B's MoE: benchmarks/RESULTS.md)
    if not train.tiled_mlp:
        candidates.append({"tiled_mlp": True})
    if train.adapter is None:
        candidates.append({"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True})
    elif not train.quantizes_weights:
        candidates += [{"load_in_8bit": True}, {"load_in_4bit": True}]
    if train.adapter is not None and train.lora_target_experts:
        candidates.append({"lora_target_experts": False})
    if train.adapter is not None and (train.lora_target_linear or train.lora_target_modules == "all-linear"):
        candidates.append({"lora_target_linear": False, "lora_target_modules": ["q_proj", "k_proj", "v_proj",
                                                                               "o_proj"]})
    mbs = train.micro_batch_size
    while mbs > 1:
        mbs //= 2
        candidates.append({"micro_batch_size": mbs, "gradient_accumulation_steps":
                           train.gradient_accumulation_steps * train.micro_batch_size // mbs})
    seq = train.sequence_len
    while seq > 512:
        seq //= 2
        candidates.append({"sequence_len": seq})
    singles = list(candidates)
    if not train.gradient_checkpointing:
        candidates += [{"gradient_checkpointing": True, **c} for c in singles if "gradient_checkpointing" not in c]
    more_gpus = [n for n in (2, 4, 8) if n > gpus]
    candidates += [{GPUS: n} for n in more_gpus]
    if not train.gradient_checkpointing:
        candidates += [{GPUS: n, "gradient_checkpointing": True} for n in more_gpus]
    if rows > 4096:  # a long row split across GPUs: those given first, then more
        split = [n for n in (2, 4, 8) if train.context_parallel_size < n <= gpus and gpus % n == 0]
        candidates += [{"context_parallel_size": n} for n in split]
        candidates += [{GPUS: n, "context_parallel_size": n} for n in more_gpus]
    return candidates


def _long_row_change(train: TrainConfig, model_config: KimiLinearConfig, gpu_bytes: float, gpus: int, rows: int,
                     host_bytes: float | None, **kwargs: Any) -> dict[str, Any] | None:
    """For long rows: every layer recomputed in pieces, the longest piece that fits (the fastest); failing that,
    the same with the saved tensors offloaded to the host; failing that, also recomputed in segments of layers
    (the fewest layers per segment that fit). None when nothing of these fits."""
    tiers: list[dict[str, Any]] = [{}, {"activation_offloading": True}]
    tiers += [{"activation_offloading": True, "recompute_segment_layers": k} for k in (2, 3, 4, 6, 9)
              if k > train.recompute_segment_layers]
    for tier in tiers:
        if tier.get("activation_offloading") and train.activation_offloading and len(tier) == 1:
            continue  # already offloading: nothing new in this tier
        # shorter pieces than now; with offloading or segments the present length too (they alone may do)
        longest = min(rows - 1, 65536, (train.sequence_piece_len or rows) - (1 if not tier else 0))
        piece = 1 << (longest.bit_length() - 1)
        while piece >= 1024:
            change: dict[str, Any] = {"gradient_checkpointing": True, "sequence_piece_len": piece, **tier}
            if train.gradient_checkpointing_layers is not None:
                change["gradient_checkpointing_layers"] = None
            plan = predict_peak_memory(train.model_copy(update=change), model_config, gpus=gpus, **kwargs)
            if plan.fits(gpu_bytes, host_bytes):
                return change
            piece //= 2
    return None


def suggest_settings(train: TrainConfig, model_config: KimiLinearConfig, gpu_bytes: float, gpus: int = 1,
                     host_bytes: float | None = None, **kwargs: Any) -> list[Suggestion]:
    """Changes of one or two settings that bring the predicted device total under ``gpu_bytes`` (and what they
    offload under ``host_bytes``, when given), smallest change first (each with its own plan); empty when nothing
    tried fits. A change may be more GPUs (``GPUS``: FSDP2 through torchrun), tried after the config's own settings.
    ``kwargs`` go to ``predict_peak_memory``."""
    found = []
    for change in _candidates(train, model_config, gpu_bytes, gpus, host_bytes, **kwargs):
        keys = {k: v for k, v in change.items() if k != GPUS}
        try:  # validated as the YAML would be
            changed = TrainConfig.model_validate(train.model_dump(exclude_unset=True) | keys)
        except ValidationError:  # a combination the config rules refuse (e.g. quantised full fine-tuning)
            continue
        plan = predict_peak_memory(changed, model_config, gpus=change.get(GPUS, gpus), **kwargs)
        if plan.fits(gpu_bytes, host_bytes):
            found.append(Suggestion(change, plan))
    # One suggestion per kind of change: the least drastic that fits (the first found: the lists go downwards).
    kept, seen = [], set()
    for suggestion in found:
        key = tuple(sorted(k for k in suggestion.change if k != "gradient_accumulation_steps"))
        if key not in seen:
            seen.add(key)
            kept.append(suggestion)
    return kept
