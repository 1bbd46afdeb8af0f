"""One GPU's weight and optimizer items under FSDP2 (``kimitune.train.distributed.shard_model``).

Parameters, their gradients and optimizer states are split over the GPUs, or live on the host with
``offload_params``. Quantised weights are buffers, which FSDP2 replicates. Gathered for compute: the root's weights
(embeddings, lm_head, final norm) for the whole step, and the decoder layers' bf16 projection weights: one layer at
a time plus ``FSDP_EXTRA_GATHERED_LAYERS`` with ``reshard_after_forward`` (the default), every layer from its forward
to its backward without it.
"""

from __future__ import annotations

from dataclasses import replace

from kimitune.config import TrainConfig
from kimitune.plan.parts import MemoryItem, Part
from kimitune.plan.shapes import ModelShapes

# Gathered layer weights beyond the one computing, held while the all-gather stream's buffers wait to be reused
# (the next layer's prefetch, frees that trail the compute stream); fitted to the 2-GPU rows of
# benchmarks/RESULTS.md, "Several GPUs". One process prefetches nothing.
FSDP_EXTRA_GATHERED_LAYERS = 1.2


def fsdp_items(items: list[MemoryItem], train: TrainConfig, shapes: ModelShapes, gpus: int,
               quantized: bool) -> list[MemoryItem]:
    """``items`` (weights, gradients, optimizer states of one process) as one of ``gpus`` GPUs holds them, and the
    weights gathered for compute."""
    fsdp = train.fsdp_config
    offload = bool(fsdp and fsdp.offload_params)
    reshard = fsdp is None or fsdp.reshard_after_forward
    sharded = []
    for item in items:
        if item.part is Part.AUTOCAST_COPIES:
            continue  # FSDP2 gathers the weights in bf16 itself (below)
        if item.part.quantised:
            sharded.append(item)
        elif offload:
            sharded.append(replace(item, bytes=0.0, on_host=True, host_bytes=item.bytes / gpus))
        else:
            sharded.append(replace(item, bytes=item.bytes / gpus, shards=gpus))
    b = 2
    layers = [0 if quantized else b * sum(p.numel for p in layer.projections) for layer in shapes.layers]
    held = (1 + FSDP_EXTRA_GATHERED_LAYERS) * max(layers) if reshard else (
        sum(layers) + FSDP_EXTRA_GATHERED_LAYERS * max(layers))
    sharded.append(MemoryItem(Part.GATHERED_ROOT, b * shapes.root_params, "the root module's weights, for the step"))
    sharded.append(MemoryItem(Part.GATHERED_LAYERS, held,
                              f"reshard_after_forward: one + {FSDP_EXTRA_GATHERED_LAYERS} layers in flight"
                              if reshard else "every layer, from its forward to its backward"))
    return sharded
