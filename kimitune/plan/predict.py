"""``predict_peak_memory``: the items of one run's peak on one GPU, from its model's shapes and activation terms.

Weights (``_weights``): frozen bf16, or with ``load_in_8bit`` the projection matrices in int8 + one float32 scale
per row (bitsandbytes' vector-wise format), with ``load_in_4bit`` 4 bits + one float32 absmax per 64 weights
(double quantisation: an 8-bit absmax per 64 + one float32 per 256 blocks); LoRA's float32 parameters; full
fine-tuning: float32 master weights plus the bf16 copies autocast keeps for the backward. Gradients and two AdamW
states per trained parameter (8-bit AdamW: ~2 bytes). Several GPUs: ``sharding.py``.

Activations (``_activations``): per token and decoder layer, ``activations.layer``. With gradient checkpointing a
recomputed layer keeps only its input, and its activations are rebuilt in the backward while the layers below it
that are not recomputed (``gradient_checkpointing_layers``) are still held. The loss keeps the final norm's input
and the hidden states' gradient (cut-cross-entropy the final hidden states: the same bytes); full logits
(``loss="full"``) T * V * (2 + 4 + 4) bytes.

Transients: the backward's gradient buffers of a MoE layer (b * C * (top_k + 2) per token), or the last layer's
forward working set when that is higher; one expert stack dequantised to bf16 (4-bit runs; 8-bit ones: the largest
projection, their stacks multiply from 8 bits); cuBLAS workspaces.

``peak_allocated`` is what ``torch.cuda.max_memory_allocated`` reports; the device needs ``ALLOCATOR_OVERHEAD``
more of everything but the weights for the caching allocator's rounding and fragmentation, plus ``CUDA_CONTEXT``
(``device_total``, compared with ``--gpu-memory``). How close this comes to the measured peaks:
benchmarks/RESULTS.md, "Peak GPU memory: census and kimitune plan" and "Several GPUs"; tests/test_plan.py holds
those rows.
"""

from __future__ import annotations

from kimitune.config import TrainConfig
from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.summary import format_count
from kimitune.model.tiled_mlp import shard_count
from kimitune.plan import activations
from kimitune.plan.activations import Kernels
from kimitune.plan.parts import GIB, MemoryItem, MemoryPlan, Part
from kimitune.plan.shapes import MLAShape, ModelShapes, model_shapes
from kimitune.plan.sharding import fsdp_items

CUBLAS_WORKSPACE = 64 * 2**20  # two cuBLAS handles' workspaces, allocated through PyTorch's caching allocator
CUDA_CONTEXT = 0.5 * GIB  # the CUDA context and kernels' modules: outside the allocator, inside nvidia-smi's number
ALLOCATOR_OVERHEAD = 0.05  # reserved / allocated - 1 at the peak: block rounding and fragmentation
BATCH_BYTES = 16  # per token: the micro-batch's input ids and labels (int64), alive through the step
ACTIVATION_BYTES = 2  # bf16
LOSSES = ("fused", "cce", "full")


def predict_peak_memory(
    train: TrainConfig,
    model_config: KimiLinearConfig,
    *,
    autocast: bool | None = None,
    packed: bool | None = None,
    loss: str | None = None,
    fused: bool = True,
    gpus: int = 1,
) -> MemoryPlan:
    """The predicted peak GPU memory of training ``model_config`` as ``train`` says (bf16 on a GPU), per GPU.

    ``autocast``: the forward runs under bf16 autocast; default: as the trainer runs it, for full fine-tuning only.
    ``packed``: packed batches (MLA through varlen flash attention); default ``train.sample_packing``.
    ``loss``: "fused" (kimitune's, the default), "cce" (cut-cross-entropy) or "full" (full logits).
    ``fused``: fla-core's fused RMSNorm / gated norm / SwiGLU kernels run (kimitune.ops.norm, on CUDA with
    fla-core installed); False for PyTorch's.
    ``gpus``: processes under torchrun, each with its own micro-batches; above 1 the model is sharded with FSDP2 as
    ``train.fsdp_config`` says (``sharding.py``). With ``train.context_parallel_size`` C, every C consecutive GPUs
    split each row: each computes T / C of its tokens (and holds the whole row's MLA latents for the layers that keep
    their activations), and FSDP2 shards over the gpus / C data ranks.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    split = train.context_parallel_size
    if gpus % split:
        raise ValueError(f"context_parallel_size {split} does not divide {gpus} GPUs: use a multiple of {split}")
    loss = loss or "fused"
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    packed = train.sample_packing if packed is None else packed
    autocast = train.adapter is None if autocast is None else autocast
    quant = "int8" if train.load_in_8bit else "fp8" if train.load_in_fp8 else "int4" if train.load_in_4bit else None
    shapes = model_shapes(train, model_config)
    row = train.micro_batch_size * train.sequence_len
    T = -(-row // split)  # this GPU's tokens of the row
    kernels = Kernels(fused_norms=fused, packed=packed, kda_keep_intermediates=train.kda_keep_intermediates)

    items = _weights(train, shapes, quant)
    if gpus // split > 1:
        items = fsdp_items(items, train, shapes, gpus // split, quant is not None)
    recomputed = recomputed_layers(train, len(shapes.layers), gpus)
    items += _offloaded(train, shapes, _activations(train, shapes, kernels, recomputed, T, loss), T)
    if split > 1:
        kept = [layer.attention for i, layer in enumerate(shapes.layers)
                if isinstance(layer.attention, MLAShape) and i not in recomputed]
        latents = sum(mla.latent_and_shared_key for mla in kept) * row * 2.0
        items.append(MemoryItem(Part.GATHERED_LATENTS, latents, f"{len(kept)} MLA layers x {row:,} tokens"))
    P = pieced_tokens(train, T) if recomputed else T
    items += _transients(shapes, recomputed, T, feed_forward_tokens(train, shapes.hidden_size, P), quant,
                         items[-1].bytes)

    peak = sum(item.bytes for item in items)
    overhead = ALLOCATOR_OVERHEAD * (peak - items[0].bytes) + CUDA_CONTEXT
    settings = {
        "tokens": T, "gpus": gpus, "context_parallel_size": split,
        "gradient_checkpointing": train.gradient_checkpointing,
        "recomputed_layers": len(recomputed), "adapter": train.adapter,
        "quantisation": quant, "loss": loss, "autocast": autocast, "packed": packed, "fused_kernels": fused,
        "kda_keep_intermediates": train.kda_keep_intermediates, "sequence_piece_len": train.sequence_piece_len,
        "activation_offloading": train.activation_offloading, "tiled_mlp": train.tiled_mlp,
    }
    return MemoryPlan(items, T, peak, peak + overhead, settings)


def _weights(train: TrainConfig, shapes: ModelShapes, quant: str | None) -> list[MemoryItem]:
    """Weights, gradients and optimizer states on one process."""
    total = shapes.total_params
    if train.adapter is None:
        copies = total - shapes.embedding_params - shapes.head_params  # autocast casts every matmul's weight
        items = [MemoryItem(Part.MASTER_WEIGHTS, float(shapes.trainable_bytes), f"{format_count(total)} params"),
                 MemoryItem(Part.AUTOCAST_COPIES, 2.0 * copies, "kept for the backward; not measured")]
    else:
        q_params = shapes.quantizable_params if quant else 0
        kept = total - q_params
        kept_bytes = shapes.frozen_bytes - (shapes.quantizable_bytes if quant else 0)
        items = [MemoryItem(Part.FROZEN_BF16, float(kept_bytes), f"{format_count(kept)} params")]
        if quant in ("int8", "fp8"):
            items.append(MemoryItem(Part.FROZEN_INT8 if quant == "int8" else Part.FROZEN_FP8,
                                    q_params + 4.0 * shapes.quantizable_rows, "+ fp32 scale per row"))
        elif quant == "int4":
            double = train.bnb_4bit_use_double_quant
            per_block = (1 + 4 / 256) if double else 4
            items.append(MemoryItem(Part.FROZEN_4BIT, q_params * 0.5 + q_params / 64 * per_block,
                                    "+ " + ("8-bit absmax per 64, fp32 per 256 blocks" if double
                                            else "fp32 absmax per 64")))
        items.append(MemoryItem(Part.LORA_WEIGHTS, float(shapes.trainable_bytes),
                                f"{format_count(shapes.trainable_params, 1)} params, {len(shapes.adapted)} modules"))
    trained = shapes.trainable_params
    eight_bit = train.optimizer == "adamw_8bit"
    items.append(MemoryItem(Part.GRADIENTS, float(shapes.trainable_bytes)))  # in the parameters' dtype
    items.append(MemoryItem(Part.OPTIMIZER, (2.0 + 2 * 4 / 2048) * trained if eight_bit else 8.0 * trained,
                            "8-bit" if eight_bit else "2 x fp32"))
    return items


def recomputed_layers(train: TrainConfig, num_layers: int, gpus: int) -> set[int]:
    """The decoder layers the run recomputes in the backward (the model's own choice of which); FSDP's settings
    count with more than one GPU."""
    from kimitune.model.modeling import checkpointed_layer_indices

    if not train.recomputes_layers(sharded=gpus > 1):
        return set()
    count = train.gradient_checkpointing_layers or num_layers
    return set(checkpointed_layer_indices(num_layers, min(count, num_layers)))


def _activations(train: TrainConfig, shapes: ModelShapes, kernels: Kernels, recomputed: set[int], T: int,
                 loss: str) -> list[MemoryItem]:
    """What the forward keeps for the backward, at the backward's peak; the last item is the loss."""
    b = ACTIVATION_BYTES
    C = shapes.hidden_size
    aux = train.router_aux_loss_coef > 0
    terms = [activations.layer(layer, b, kernels, aux) for layer in shapes.layers]
    full_inputs = [activations.full_finetune_inputs(layer, b) if train.adapter is None else 0
                   for layer in shapes.layers]
    # Per token, what a layer keeps over all its tokens, and what one shard of its feed-forward block holds at a
    # time besides (its kept terms and forward working set): with tiled_mlp the block keeps only its input (b * C).
    if train.tiled_mlp:
        per_layer = [t.norms + activations.total(t.attention) + (b * C if t.feed_forward else 0) + f
                     for t, f in zip(terms, full_inputs)]
        per_shard = [activations.total(t.feed_forward) + activations.forward_working_set(layer, b)
                     for t, layer in zip(terms, shapes.layers)]
    else:
        per_layer = [t.total + f for t, f in zip(terms, full_inputs)]
        per_shard = [activations.forward_working_set(layer, b) for layer in shapes.layers]
    items = []
    P = pieced_tokens(train, T)
    if recomputed:
        whole = [per_layer[i] for i in range(len(per_layer)) if i not in recomputed]
        # The backward reaches a recomputed layer j still holding the whole layers below it: the peak is the
        # largest such sum with j's rebuilt activations and its forward working set (the recomputation runs inside
        # the backward; of one piece when the layers run in pieces, whose MLA pieces attend over the earlier
        # pieces one at a time; of one shard of the feed-forward block with tiled_mlp), or all whole layers at the
        # backward's start.
        Q = feed_forward_tokens(train, C, P)
        rebuilt = max(sum(per_layer[i] for i in range(j) if i not in recomputed) * T
                      + per_layer[j] * P + per_shard[j] * Q
                      + (activations.piece_attention_keys(shapes.layers[j], b, P) if P < T else 0)
                      for j in recomputed)
        k = train.recompute_segment_layers
        # With segments of k layers, one input per segment is kept, and the backward rebuilds one segment's k - 1
        # others (and their states between pieces) at a time.
        groups = [range(s, min(s + k, len(shapes.layers))) for s in range(0, len(shapes.layers), k)] if k > 1 \
            else [sorted(recomputed)]
        kept_inputs = len(groups) if k > 1 else len(recomputed)
        items.append(MemoryItem(Part.CHECKPOINT_INPUTS, kept_inputs * b * C * T,
                                f"{kept_inputs} x {b}C per token" + (f": one per {k} layers" if k > 1 else "")))
        if k > 1:
            items.append(MemoryItem(Part.SEGMENT_INPUTS, (max(map(len, groups)) - 1) * b * C * T,
                                    f"{max(map(len, groups)) - 1} x {b}C per token"))
        if P < T:
            kept = max(sum(activations.piece_states(shapes.layers[j], b, T, P) for j in group) for group in groups)
            items.append(MemoryItem(Part.PIECE_STATES, kept, "KDA states at each cut, MLA latents"))
        if whole:
            items.append(MemoryItem(Part.WHOLE_LAYERS, sum(whole) * T,
                                    f"{sum(whole) / 1024:.0f} KiB per token over {len(whole)} layers"))
        note = f"largest recomputed layer: {max(per_layer[j] for j in recomputed) / 1024:.0f} KiB per token"
        note += f" over one piece of {P} tokens" if P < T else ""
        items.append(MemoryItem(Part.REBUILT_LAYER, max(0, rebuilt - sum(whole) * T),
                                note + ", and its forward working set"))
    else:
        # with tiled_mlp the backward rebuilds one shard of a feed-forward block at a time
        shard = max(per_shard) * feed_forward_tokens(train, C, T) if train.tiled_mlp else 0
        items.append(MemoryItem(Part.ACTIVATIONS, sum(per_layer) * T + shard,
                                f"{sum(per_layer) / 1024:.0f} KiB per token over {len(per_layer)} layers"
                                + (", and one feed-forward shard" if shard else "")))
    kept = activations.rms_norm(shapes.final_norm, b, kernels) + activations.loss(C, b) + BATCH_BYTES
    if loss == "full":
        kept += (2 + 4 + 4) * shapes.vocab_size
    note = {"fused": "fused cross-entropy: the final hidden states' gradient",
            "cce": "cut cross-entropy: final hidden states", "full": "full logits: bf16 + fp32 + gradient"}[loss]
    items.append(MemoryItem(Part.LOSS, kept * T, note + "; the final norm's input"))
    return items


OFFLOADED_PARTS = (Part.CHECKPOINT_INPUTS, Part.PIECE_STATES, Part.WHOLE_LAYERS, Part.ACTIVATIONS)


def _offloaded(train: TrainConfig, shapes: ModelShapes, items: list[MemoryItem], T: int) -> list[MemoryItem]:
    """With ``activation_offloading`` (kimitune/train/offload.py), what the forward saves waits in pinned host
    memory, and the backward brings one layer's share back at a time (its input and its states between pieces)."""
    if not train.activation_offloading:
        return items
    moved, layers = [], len(shapes.layers)
    for item in items:
        if item.part in OFFLOADED_PARTS:
            moved.append(MemoryItem(item.part, 0.0, f"{item.bytes / GIB:.1f} GiB in pinned host memory", on_host=True,
                                    host_bytes=item.bytes))
    back = sum(item.bytes for item in items if item.part in OFFLOADED_PARTS) / layers
    kept = [item for item in items if item.part not in OFFLOADED_PARTS]
    return moved + [MemoryItem(Part.BROUGHT_BACK, back, "one layer's share of the offloaded tensors")] + kept


def pieced_tokens(train: TrainConfig, T: int) -> int:
    """The tokens one recomputed layer works on at a time: ``sequence_piece_len`` when set and shorter than the row's
    ``T``, else ``T``."""
    return min(train.sequence_piece_len or T, T)


def feed_forward_tokens(train: TrainConfig, hidden_size: int, P: int) -> int:
    """The tokens a feed-forward block works on at a time in a layer call of ``P`` tokens: one shard's with
    ``tiled_mlp`` (model/tiled_mlp.py), else ``P``."""
    if not train.tiled_mlp:
        return P
    return -(-P // shard_count(P, hidden_size, train.tiled_mlp_num_shards))


def _transients(shapes: ModelShapes, recomputed: set[int], T: int, P: int, quant: str | None,
                loss_bytes: float) -> list[MemoryItem]:
    """Memory held for a moment at the peak: one layer's backward gradient buffers (those of its MoE for the ``P``
    tokens it works on at a time: a piece's, or a shard's, the gradients of its input and output for all ``T``), or
    the last layer's forward working set at the forward's end (without recomputation, over every layer's
    activations, before the loss)."""
    b = ACTIVATION_BYTES
    top_k = max((layer.feed_forward.top_k for layer in shapes.layers if layer.is_moe), default=0)
    transient = b * shapes.hidden_size * (top_k * P + 2 * T)
    note = "one layer's backward gradient buffers"
    if not recomputed:
        working = activations.forward_working_set(shapes.layers[-1], b) * P - loss_bytes
        if working > transient:
            transient, note = working, "the last layer's forward working set (the peak is at the forward's end)"
    items = [MemoryItem(Part.TRANSIENT, transient, note)]
    if quant in ("int8", "fp8"):  # the expert stacks multiply from 8 bits (kimitune.ops.quant_grouped_mm)
        items.append(MemoryItem(Part.DEQUANTISED, 2.0 * shapes.largest_quantizable_linear,
                                "largest projection, bf16; the expert stacks dequantise tile by tile"))
    elif quant:
        items.append(MemoryItem(Part.DEQUANTISED, 2.0 * shapes.largest_quantizable, "largest stack, bf16"))
    items.append(MemoryItem(Part.CUBLAS, CUBLAS_WORKSPACE))
    return items
