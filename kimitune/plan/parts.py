"""The plan's result: ``MemoryPlan``, a list of ``MemoryItem`` keyed by ``Part``, the peak and the device total."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

GIB = 2**30


class Part(Enum):
    """What an item of the plan counts; the value is its printed label."""

    FROZEN_BF16 = "frozen weights, bf16"
    FROZEN_INT8 = "frozen weights, int8"
    FROZEN_4BIT = "frozen weights, 4-bit"
    FROZEN_FP8 = "frozen weights, fp8 e4m3"
    MASTER_WEIGHTS = "weights (fp32 master)"
    AUTOCAST_COPIES = "bf16 weight copies (autocast)"
    LORA_WEIGHTS = "LoRA weights (fp32)"
    GRADIENTS = "gradients (fp32)"
    OPTIMIZER = "AdamW states"
    GATHERED_ROOT = "gathered: embeddings, lm_head"
    GATHERED_LAYERS = "gathered: decoder layers"
    CHECKPOINT_INPUTS = "layer inputs (checkpointing)"
    WHOLE_LAYERS = "activations of layers not recomputed"
    REBUILT_LAYER = "one layer rebuilt in the backward"
    PIECE_STATES = "states between pieces"
    GATHERED_LATENTS = "MLA latents of the whole row (context parallelism)"
    SEGMENT_INPUTS = "one segment's inputs, rebuilt"
    BROUGHT_BACK = "offloaded, back for one layer"
    ACTIVATIONS = "activations"
    LOSS = "loss"
    TRANSIENT = "largest transient"
    DEQUANTISED = "dequantised weight (transient)"
    CUBLAS = "cuBLAS workspaces"

    @property
    def quantised(self) -> bool:
        """Quantised weights: buffers, which FSDP2 replicates on every GPU rather than shards."""
        return self in (Part.FROZEN_INT8, Part.FROZEN_4BIT, Part.FROZEN_FP8)


@dataclass(frozen=True)
class MemoryItem:
    """``bytes`` on one GPU for ``part``. ``shards``: the GPUs a sharded item is split over (1: whole);
    ``on_host``: offloaded to CPU memory (then ``bytes`` is 0 and ``host_bytes`` what it takes there)."""

    part: Part
    bytes: float
    note: str = ""
    shards: int = 1
    on_host: bool = False
    host_bytes: float = 0.0

    @property
    def name(self) -> str:
        if self.on_host:
            return f"{self.part.value} (on the host)"
        return f"{self.part.value} (1/{self.shards})" if self.shards > 1 else self.part.value


@dataclass
class MemoryPlan:
    """The predicted peak of one training run: a breakdown, the peak as PyTorch counts it, and the device total."""

    items: list[MemoryItem]
    tokens: int  # per micro-batch
    peak_allocated: float  # bytes; compare with torch.cuda.max_memory_allocated
    device_total: float  # bytes; peak_allocated + allocator overhead + CUDA context
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_allocated_gib(self) -> float:
        return self.peak_allocated / GIB

    @property
    def device_total_gib(self) -> float:
        return self.device_total / GIB

    @property
    def host_total(self) -> float:
        """Bytes of the items offloaded to the host's (pinned) memory."""
        return sum(item.host_bytes for item in self.items)

    def fits(self, gpu_bytes: float, host_bytes: float | None = None) -> bool:
        """Within the GPU's memory, and the host's too when ``host_bytes`` is given."""
        return self.device_total <= gpu_bytes and (host_bytes is None or self.host_total <= host_bytes)

    def item(self, part: Part) -> MemoryItem:
        """The item for ``part``; KeyError when the plan has none."""
        for item in self.items:
            if item.part is part:
                return item
        raise KeyError(part)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_micro_batch": self.tokens,
            "items": [{"key": i.part.name.lower(), "name": i.name, "gib": i.bytes / GIB, "note": i.note}
                      for i in self.items],
            "peak_allocated_gib": self.peak_allocated_gib,
            "device_total_gib": self.device_total_gib,
            "host_gib": self.host_total / GIB,
            "settings": self.settings,
        }
