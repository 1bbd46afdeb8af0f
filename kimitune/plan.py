"""`kimitune plan`: the peak GPU memory of a training run, predicted from its config before anything is loaded.

An analytic model, per byte (T = micro_batch_size * sequence_len tokens per micro-batch; b = 2, bf16 activations):

- frozen weights: bf16 (2 bytes), or with ``load_in_8bit`` the projection matrices in int8 + one float32 scale
  per row (bitsandbytes' vector-wise format), with ``load_in_4bit`` NF4/FP4: 4 bits + one float32 absmax per 64
  weights (double quantisation: an 8-bit absmax per 64 + one float32 per 256 blocks); embeddings, LM head, norms,
  conv, gate vectors and the router stay bf16 (``kimitune.model.summary``);
- trainable weights: LoRA (float32) parameters + gradients + two AdamW states (8-bit AdamW: ~2 bytes of state);
  full fine-tuning: float32 master weights + gradients + states, plus the bf16 copies autocast keeps for the backward;
- activations kept for the backward, per token and decoder layer, by layer kind; measured on an H100 with
  ``benchmarks/memory_census.py`` for the 48B widths (see ``_kda_bytes`` ...), written as functions of the widths
  so they carry to other shapes; LoRA adds each adapted linear's rank-r product and keeps its input alive (once
  per tensor: q, k, v and the gates read the same one; a copy per linear with lora_dropout); with gradient
  checkpointing a recomputed layer keeps only its input, and its activations are rebuilt in the backward while
  the layers below it that are not recomputed (``gradient_checkpointing_layers``) are still held;
- the loss: kimitune's fused cross-entropy (``kimitune.ops.loss``) keeps the gradient of the final hidden states,
  computed in the forward (its [chunk, vocab] logits are freed before the backward starts); cut-cross-entropy keeps
  the final hidden states: the same bytes; full logits (transformers' way, ``loss="full"``) T * vocab * (2 + 4 + 4)
  bytes;
- transients: the backward's gradient buffers of a MoE layer (b * C * (top_k + 2) per token), one expert stack
  dequantised to bf16 (quantised runs), cuBLAS workspaces (64 MiB);
- several GPUs (``gpus``, FSDP2 under torchrun): parameters, gradients and optimizer states split over the GPUs (or
  on the host with ``offload_params``; quantised weights are replicated buffers), plus the weights gathered for
  compute: the root's (embeddings, lm_head) for the step, and decoder layers, one at a time plus
  ``FSDP_EXTRA_GATHERED_LAYERS`` in flight, or all of them with ``reshard_after_forward: false``;
- the CUDA allocator's overhead: ``peak_allocated`` is what ``torch.cuda.max_memory_allocated`` reports (what the
  benchmarks measure); the device needs ~5% more for the caching allocator's rounding and fragmentation plus
  ~0.5 GiB of CUDA context (``device_total``, compared with ``--gpu-memory``).

Calibration (benchmarks/RESULTS.md, GPU training section and its memory census; tests/test_plan.py): the per-kind
terms come from the census of the 4-layer 48B-widths LoRA run (PyTorch norms, then); against the current code
(fla's fused norms, LoRA products in bf16) the plan is within 1.3% of the five measured rows (15.7 / 13.4 GiB at
4096 tokens without / with checkpointing, 17.3 at 16384 with, 17.6 / 14.8 with expert LoRA). When the model code
changes what it saves, re-run ``benchmarks/memory_census.py`` and update the per-kind terms below. With some layers
recomputed (``gradient_checkpointing_layers``) it is within 4% of the three measured rows (4-layer at 4096 and
16384 tokens, the whole 48B in bf16 at 8192, which it over-predicts by 3.9%). On 2 GPUs the
plan is within 4% of the four 4-layer rows that ``FSDP_EXTRA_GATHERED_LAYERS`` was fitted to, and within 0.5% of
the whole 48B in bf16 (58.7 GiB per GPU), which it was not fitted to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimitune.config import ConfigError, TrainConfig
from kimitune.model.configuration import KimiLinearConfig

GIB = 2**30
CUBLAS_WORKSPACE = 64 * 2**20  # two cuBLAS handles' workspaces, allocated through PyTorch's caching allocator
CUDA_CONTEXT = 0.5 * GIB  # the CUDA context and kernels' modules: outside the allocator, inside nvidia-smi's number
ALLOCATOR_OVERHEAD = 0.05  # reserved / allocated - 1 at the peak: block rounding and fragmentation
# FSDP2 on 2+ GPUs: gathered layer weights beyond the one computing, held while the all-gather stream's buffers
# wait to be reused (the next layer's prefetch, frees that trail the compute stream). Fitted to the four 2-GPU rows
# of benchmarks/RESULTS.md ("Several GPUs", 1.0-1.5 measured); 0 on one process, where nothing is prefetched.
FSDP_EXTRA_GATHERED_LAYERS = 1.2


@dataclass
class MemoryItem:
    name: str
    bytes: float
    note: str = ""


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

    def fits(self, gpu_bytes: float) -> bool:
        return self.device_total <= gpu_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_micro_batch": self.tokens,
            "items": [{"name": i.name, "gib": i.bytes / GIB, "note": i.note} for i in self.items],
            "peak_allocated_gib": self.peak_allocated_gib,
            "device_total_gib": self.device_total_gib,
            "settings": self.settings,
        }


# ----- the model's parts, from the config alone ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Linear:
    layer: int  # -1 outside the decoder layers
    name: str  # full in-memory name
    in_features: int
    out_features: int
    copies: int = 1  # token copies it sees per token (top_k for routed experts)


def _lora_targets(train: TrainConfig, model_config: KimiLinearConfig) -> list[_Linear]:
    """The modules LoRA adapts, found on a meta-device model (no memory, no weights) with the trainer's rules."""
    import torch

    from kimitune.train.settings import lora_settings
    from kimitune.model import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(model_config)
    targets = lora_settings(train).targets(model)
    found = []
    for name in targets.linears:
        module = model.get_submodule(name)
        found.append(_Linear(_layer_of(name), name, module.in_features, module.out_features))
    for module_name, projection in targets.experts:
        out, inp = getattr(model.get_submodule(module_name), projection).shape[1:]
        found.append(_Linear(_layer_of(module_name), f"{module_name}.{projection}", inp, out,
                             copies=model_config.num_experts_per_token))
    return found


def _layer_of(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _quantized_matrices(config: KimiLinearConfig) -> tuple[int, int, int]:
    """(quantised parameters, their rows, the largest quantised tensor's numel): the projection matrices and
    expert stacks that load_in_8bit / load_in_4bit quantise."""
    from kimitune.model.summary import summarize

    params = summarize(config).quantizable_params
    rows, largest = 0, 0
    for i in range(config.num_hidden_layers):
        for inp, out, count in _layer_matrices(config, i):
            rows += out * count
            largest = max(largest, inp * out * count)
    return params, rows, largest


def _layer_matrices(config: KimiLinearConfig, i: int) -> list[tuple[int, int, int]]:
    """(in, out, count) of every projection matrix of layer i; an expert stack is one tensor of ``count`` matrices."""
    C = config.hidden_size
    if config.is_kda_layer(i):
        H, K = config.kda_num_heads, config.kda_head_dim
        D = H * K
        attn = [(C, D, 1)] * 3 + [(D, C, 1), (C, K, 1), (K, D, 1), (C, K, 1), (K, D, 1), (C, H, 1)]
    else:
        heads, qk = config.num_attention_heads, config.qk_head_dim
        rank = config.kv_lora_rank
        q = ([(C, heads * qk, 1)] if config.q_lora_rank is None
             else [(C, config.q_lora_rank, 1), (config.q_lora_rank, heads * qk, 1)])
        attn = q + [(C, rank + config.qk_rope_head_dim, 1),
                    (rank, heads * (config.qk_nope_head_dim + config.v_head_dim), 1),
                    (heads * config.v_head_dim, C, 1)]
    if config.is_moe_layer(i):
        I, E = config.moe_intermediate_size, config.num_experts
        shared = I * config.num_shared_experts
        ff = [(C, 2 * I, E), (I, C, E)]
        if shared:
            ff += [(C, shared, 1), (C, shared, 1), (shared, C, 1)]
    else:
        ff = [(C, config.intermediate_size, 1)] * 2 + [(config.intermediate_size, C, 1)]
    return attn + ff


# ----- activations per token (bytes), measured with benchmarks/memory_census.py on an H100 --------------------------

def _layer_common(C: int, b: int, fused: bool) -> int:
    """fla's fused RMSNorms keep their (residual-stream) input and one float32 inverse RMS per row; PyTorch's keep
    a float32 copy of the input, and the layer's output (the next one's input) b * C stays alive."""
    return 2 * b * C + 8 if fused else 2 * 4 * C + b * C


def _kda_bytes(config: KimiLinearConfig, b: int, fused: bool, keep_intermediates: bool = False) -> int:
    """KDA besides its adapted linears, per channel of the H * K width: the short conv's input (q, k, v: 3b), the
    kernel's q, k, v (3b) and the forget gate's raw input (b: fla computes the decay inside its kernels and
    recomputes it in the backward, kimitune/ops/kda/gate.py); the gated output norm: fla's fused kernel keeps its
    input and gate (2b) and an inverse RMS per head, PyTorch's its float32 input, normed product and sigmoid
    (3 * 4). Before the gate moved into the kernel the float32 decay, its cumulative sum and softplus's input took
    12 bytes where the raw input takes b: measured 35.9 bytes per channel then, with PyTorch's norm.

    ``keep_intermediates`` (fla's ``disable_recompute``): fla also keeps w, q * exp(g), k * exp(g), u and the new
    values v_new (five [T, H, K] in b bytes; KDA's V = K), the chunk states [T / 64, H, K, K] in b, and the decay's
    cumulative sum in float32: 18 bytes per channel at K = 128, as measured on the 48B (+11.25 GiB at 8192
    tokens)."""
    H, K = config.kda_num_heads, config.kda_head_dim
    norm = 2 * b * H * K + 4 * H if fused else 12 * H * K
    kept = b * (5 * H * K + H * K * K // 64) + 4 * H * K if keep_intermediates else 0
    return 7 * b * H * K + norm + kept


def _mla_bytes(config: KimiLinearConfig, b: int, fused: bool, packed: bool) -> int:
    """MLA besides its adapted linears: q and k (nope + rope per head), the kv_b output (k_nope and v per head,
    v being a view into it), the latent norm's saved input (float32 copy with PyTorch's norm; measured within 2%
    at the 48B widths). Packed batches go through flash attention's varlen kernel: contiguous q, k, v padded to
    the key width and the padded output (4 b H (nope + rope); not measured)."""
    heads = config.num_attention_heads
    latent = (b * config.kv_lora_rank + 4) if fused else 4 * config.kv_lora_rank
    if packed:
        return 4 * b * heads * config.qk_head_dim + latent
    return (2 * b * heads * config.qk_head_dim + b * heads * (config.qk_nope_head_dim + config.v_head_dim)
            + latent)


def _mlp_bytes(intermediate: int, b: int, fused: bool) -> int:
    """SwiGLU besides its adapted linears: the gate and up outputs, and with PyTorch's (unfused) product silu's
    output too."""
    return (2 if fused else 3) * b * intermediate


def _moe_bytes(config: KimiLinearConfig, b: int, fused: bool) -> int:
    """MoE besides its adapted linears: per routed copy (top_k per token) the gate_up rows the weighted SwiGLU keeps
    (2 b I; neither the expert input nor output rows are kept: the frozen grouped products save no activation and
    the routing weight scales the SwiGLU, kimitune/ops/expert_swiglu.py), its float32 routing weight and three sort
    indices; the router's float32 scores (4 * E); the shared expert's SwiGLU; and 4 * C measured but not attributed
    (9.6 KiB per token at the 48B widths)."""
    C, k = config.hidden_size, config.num_experts_per_token
    routed = k * (2 * b * config.moe_intermediate_size + 4 + 8 * 3)
    shared = _mlp_bytes(config.moe_intermediate_size * config.num_shared_experts, b, fused)
    return routed + 4 * config.num_experts + shared + 4 * C


def _forward_working_bytes(config: KimiLinearConfig, i: int, b: int) -> int:
    """Bytes per token decoder layer i holds for a moment in its forward beyond what it keeps: in a MoE layer the
    expert rows (per routed copy its input, gate_up output and SwiGLU output, C + 3I values: measured 83.8 KiB per
    token at the 48B widths against 86 from this), in a dense one the MLP's intermediate (measured 20 KiB)."""
    if config.is_moe_layer(i):
        return config.num_experts_per_token * b * (config.hidden_size + 3 * config.moe_intermediate_size)
    return b * config.intermediate_size


def _layer_bytes(config: KimiLinearConfig, i: int, b: int, lora: list[_Linear], r: int, dropout: float,
                 fused: bool, packed: bool, keep_kda: bool = False) -> int:
    """Bytes per token that decoder layer i keeps for the backward (its output included)."""
    C = config.hidden_size
    total = _layer_common(C, b, fused)
    total += (_kda_bytes(config, b, fused, keep_kda) if config.is_kda_layer(i)
              else _mla_bytes(config, b, fused, packed))
    if config.is_moe_layer(i):
        total += _moe_bytes(config, b, fused)
    else:
        total += _mlp_bytes(config.intermediate_size, b, fused)
    return total + _lora_bytes([t for t in lora if t.layer == i], b, r, dropout)


# Adapted linears that read the same tensor (a decoder layer's normed input): LoRA keeps that tensor alive once.
_SHARED_INPUTS = {
    "attention input": re.compile(r"self_attn\.(q_proj|k_proj|v_proj|b_proj|g_a_proj|q_a_proj|kv_a_proj_with_mqa|"
                                  r"forget_gate\.f_a_proj)$"),
    "mlp input": re.compile(r"mlp\.(shared_experts\.)?(gate_proj|up_proj)$"),
}


def _lora_bytes(targets: list[_Linear], b: int, r: int, dropout: float) -> int:
    """Bytes per token LoRA keeps in one layer. The low-rank products run in the layer's dtype on its input as it
    is (``adapters.layers.lora_compute_dtype``): each adapted linear keeps the scaled [T, r] product for dB, and
    its input is a reference to a tensor the frozen product would otherwise drop (kept once per tensor: a layer's
    q, k, v and gate projections read the same one). With lora_dropout each linear keeps its own dropped-out copy
    and the mask instead."""
    total, shared = 0, set()
    for target in targets:
        total += target.copies * b * r
        if dropout > 0:
            total += target.copies * (b + 1) * target.in_features
            continue
        group = next((name for name, pattern in _SHARED_INPUTS.items() if pattern.search(target.name)), target.name)
        if group not in shared:
            shared.add(group)
            total += target.copies * b * target.in_features
    return total


def _recomputed_layers(train: TrainConfig, num_layers: int, gpus: int) -> set[int]:
    """The decoder layers the run recomputes in the backward (the model's own choice of which); FSDP's settings
    count with more than one GPU."""
    from kimitune.model.modeling import checkpointed_layer_indices

    if not train.recomputes_layers(sharded=gpus > 1):
        return set()
    count = train.gradient_checkpointing_layers or num_layers
    return set(checkpointed_layer_indices(num_layers, min(count, num_layers)))


# ----- the plan ------------------------------------------------------------------------------------------------------

def predict_peak_memory(
    train: TrainConfig,
    model_config: KimiLinearConfig,
    *,
    autocast: bool = True,
    packed: bool | None = None,
    loss: str | None = None,
    fused: bool = True,
    gpus: int = 1,
) -> MemoryPlan:
    """The predicted peak GPU memory of training ``model_config`` as ``train`` says (bf16 on a GPU), per GPU.

    ``autocast``: the trainer runs the forward under bf16 autocast (True); the benchmarks do not (False).
    ``packed``: packed batches (MLA through varlen flash attention); default ``train.sample_packing``.
    ``loss``: "fused" (kimitune's, the default), "cce" (cut-cross-entropy) or "full" (full logits).
    ``fused``: fla-core's fused RMSNorm / gated norm / SwiGLU kernels run (kimitune.ops.norm, on CUDA with
    fla-core installed); False for PyTorch's (what the GPU figures of benchmarks/RESULTS.md were measured with).
    ``gpus``: processes under torchrun, each with its own micro-batches; above 1 the model is sharded with FSDP2 as
    ``train.fsdp_config`` says (``_fsdp_items``).
    """
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    cfg = model_config
    b = 2
    C, V = cfg.hidden_size, cfg.vocab_size
    T = train.micro_batch_size * train.sequence_len
    packed = train.sample_packing if packed is None else packed
    loss = loss or "fused"
    full_ft = train.adapter is None
    quant = "int8" if train.load_in_8bit else ("int4" if train.load_in_4bit else None)
    double_quant = bool(getattr(train, "bnb_4bit_use_double_quant", False))
    items: list[MemoryItem] = []

    from kimitune.model.summary import summarize

    total_params = summarize(cfg).total_params
    q_params, q_rows, q_largest = _quantized_matrices(cfg)

    # weights
    if full_ft:
        items.append(MemoryItem("weights (fp32 master)", 4.0 * total_params, f"{total_params / 1e9:.2f}B params"))
        items.append(MemoryItem("bf16 weight copies (autocast)", 2.0 * (total_params - 2 * V * C),
                                "kept for the backward; not measured"))
        trainable = total_params
    else:
        kept = total_params - (q_params if quant else 0)
        items.append(MemoryItem("frozen weights, bf16", 2.0 * kept, f"{kept / 1e9:.2f}B params"))
        if quant == "int8":
            items.append(MemoryItem("frozen weights, int8", q_params + 4.0 * q_rows, "+ fp32 scale per row"))
        elif quant == "int4":
            per_block = (1 + 4 / 256) if double_quant else 4
            items.append(MemoryItem("frozen weights, 4-bit", q_params * 0.5 + q_params / 64 * per_block,
                                    "+ " + ("8-bit absmax per 64, fp32 per 256 blocks" if double_quant
                                            else "fp32 absmax per 64")))
        lora = _lora_targets(train, cfg)
        trainable = sum((t.in_features + t.out_features) * train.lora_r * _expert_count(cfg, t) for t in lora)
        items.append(MemoryItem("LoRA weights (fp32)", 4.0 * trainable, f"{trainable / 1e6:.1f}M params, "
                                f"{len(lora)} modules"))
    grads = 4.0 * trainable
    states = (2.0 + 2 * 4 / 2048) * trainable if train.optimizer == "adamw_8bit" else 8.0 * trainable
    items.append(MemoryItem("gradients (fp32)", grads))
    items.append(MemoryItem("AdamW states", states, "8-bit" if train.optimizer == "adamw_8bit" else "2 x fp32"))

    if gpus > 1:
        items = _fsdp_items(items, train, cfg, gpus, quant is not None)

    # activations
    if full_ft:  # every linear keeps its (autocast bf16) input for its weight gradient; not measured
        per_layer = [_layer_bytes(cfg, i, b, [], 0, 0.0, fused, packed, train.kda_keep_intermediates)
                     + sum(b * inp * (1 if count == 1 else cfg.num_experts_per_token)
                           for inp, _, count in _layer_matrices(cfg, i))
                     for i in range(cfg.num_hidden_layers)]
    else:
        per_layer = [_layer_bytes(cfg, i, b, lora, train.lora_r, train.lora_dropout, fused, packed,
                                  train.kda_keep_intermediates)
                     for i in range(cfg.num_hidden_layers)]
    recomputed = _recomputed_layers(train, cfg.num_hidden_layers, gpus)
    if recomputed:
        whole = [per_layer[i] for i in range(cfg.num_hidden_layers) if i not in recomputed]
        # The backward reaches a recomputed layer j still holding the whole layers below it: the peak is the
        # largest such sum with j's rebuilt activations and its forward working set (the recomputation runs inside
        # the backward), or all whole layers at the backward's start.
        rebuilt = max(sum(per_layer[i] for i in range(j) if i not in recomputed) + per_layer[j]
                      + _forward_working_bytes(cfg, j, b) for j in recomputed)
        items.append(MemoryItem("layer inputs (checkpointing)", len(recomputed) * b * C * T,
                                f"{len(recomputed)} x {b}C per token"))
        if whole:
            items.append(MemoryItem("activations of layers not recomputed", sum(whole) * T,
                                    f"{sum(whole) / 1024:.0f} KiB per token over {len(whole)} layers"))
        items.append(MemoryItem("one layer rebuilt in the backward", max(0, rebuilt - sum(whole)) * T,
                                f"largest recomputed layer: {max(per_layer[j] for j in recomputed) / 1024:.0f} "
                                "KiB per token, and its forward working set"))
        loss_kept = 2 * b * C * T if cfg.num_hidden_layers - 1 in recomputed else (b * C + 16) * T
    else:
        items.append(MemoryItem("activations", sum(per_layer) * T,
                                f"{sum(per_layer) / 1024:.0f} KiB per token over {cfg.num_hidden_layers} layers"))
        loss_kept = (b * C + 16) * T

    # loss
    loss_note = {"fused": "fused cross-entropy: the final hidden states' gradient",
                 "cce": "cut cross-entropy: final hidden states", "full": "full logits: bf16 + fp32 + gradient"}[loss]
    if loss == "full":
        loss_kept += (2 + 4 + 4) * V * T
    items.append(MemoryItem("loss", loss_kept, loss_note))

    # transients: one layer's backward gradient buffers; without recomputation the end of the forward (the last
    # layer's working set over every layer's activations, before the loss) may be the higher peak instead
    any_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    transient = b * C * ((cfg.num_experts_per_token if any_moe else 0) + 2) * T
    note = "one layer's backward gradient buffers"
    if not recomputed:
        working = _forward_working_bytes(cfg, cfg.num_hidden_layers - 1, b) * T - loss_kept
        if working > transient:
            transient, note = working, "the last layer's forward working set (the peak is at the forward's end)"
    items.append(MemoryItem("largest transient", transient, note))
    if quant:
        items.append(MemoryItem("dequantised weight (transient)", 2.0 * q_largest, "largest stack, bf16"))
    items.append(MemoryItem("cuBLAS workspaces", CUBLAS_WORKSPACE))

    peak = sum(item.bytes for item in items)
    overhead = ALLOCATOR_OVERHEAD * (peak - items[0].bytes) + CUDA_CONTEXT
    settings = {
        "tokens": T, "gpus": gpus, "gradient_checkpointing": train.gradient_checkpointing,
        "recomputed_layers": len(recomputed), "adapter": train.adapter,
        "quantisation": quant, "loss": loss, "autocast": autocast, "packed": packed, "fused_kernels": fused,
        "kda_keep_intermediates": train.kda_keep_intermediates,
    }
    return MemoryPlan(items, T, peak, peak + overhead, settings)


def _fsdp_items(items: list[MemoryItem], train: TrainConfig, cfg: KimiLinearConfig, gpus: int,
                quantized: bool) -> list[MemoryItem]:
    """The weight and optimizer items of one GPU under FSDP2 (kimitune.train.distributed.shard_model).

    Parameters, their gradients and optimizer states are split over the GPUs, or live on the host with
    ``offload_params``. Quantised weights are buffers, which FSDP2 replicates. Gathered for compute: the root's
    weights (embeddings, lm_head, final norm) for the whole step, and the decoder layers' bf16 weights: one layer at a
    time plus ``FSDP_EXTRA_GATHERED_LAYERS`` with ``reshard_after_forward`` (the default), every layer from its
    forward to its backward without it.
    """
    fsdp = train.fsdp_config
    offload = bool(fsdp and fsdp.offload_params)
    reshard = fsdp is None or fsdp.reshard_after_forward
    sharded = []
    for item in items:
        if item.name == "bf16 weight copies (autocast)":
            continue  # FSDP2 gathers the weights in bf16 itself (below)
        if item.name.startswith("frozen weights,") and item.name != "frozen weights, bf16":
            sharded.append(item)  # quantised: replicated buffers
        elif offload:
            sharded.append(MemoryItem(item.name + " (on the host)", 0.0, item.note))
        else:
            sharded.append(MemoryItem(item.name + f" (1/{gpus})", item.bytes / gpus, item.note))
    b = 2
    root = b * (2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    layers = [0 if quantized else b * sum(inp * out * count for inp, out, count in _layer_matrices(cfg, i))
              for i in range(cfg.num_hidden_layers)]
    held = (1 + FSDP_EXTRA_GATHERED_LAYERS) * max(layers) if reshard else (
        sum(layers) + FSDP_EXTRA_GATHERED_LAYERS * max(layers))
    sharded.append(MemoryItem("gathered: embeddings, lm_head", root, "the root module's weights, for the step"))
    sharded.append(MemoryItem("gathered: decoder layers", held,
                              f"reshard_after_forward: one + {FSDP_EXTRA_GATHERED_LAYERS} layers in flight"
                              if reshard else "every layer, from its forward to its backward"))
    return sharded


def _expert_count(cfg: KimiLinearConfig, target: _Linear) -> int:
    return cfg.num_experts if target.copies > 1 else 1


# ----- what would make it fit ---------------------------------------------------------------------------------------

@dataclass
class Suggestion:
    change: dict[str, Any]  # config keys -> values
    plan: MemoryPlan

    @property
    def text(self) -> str:
        return ", ".join(f"{v} GPUs (torchrun --nproc_per_node {v})" if k == "gpus" else f"{k}: {_yaml(v)}"
                         for k, v in self.change.items())


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return str(value)


def suggest_settings(train: TrainConfig, model_config: KimiLinearConfig, gpu_bytes: float, gpus: int = 1,
                     **kwargs: Any) -> list[Suggestion]:
    """Changes of one or two settings that bring the predicted device total under ``gpu_bytes``, smallest
    change first (each with its own plan); empty when nothing tried fits. A change may be more GPUs ("gpus": FSDP2
    through torchrun), tried after the config's own settings."""
    candidates: list[dict[str, Any]] = []
    layers = model_config.num_hidden_layers
    if train.kda_keep_intermediates:  # the cheapest memory to give back: ~2.5% of speed
        candidates.append({"kda_keep_intermediates": False})
    recomputing = len(_recomputed_layers(train, layers, gpus))
    for count in range(recomputing + 1, layers):  # recompute as few layers as fit: the smallest slow-down
        change = {"gradient_checkpointing": True, "gradient_checkpointing_layers": count}
        if predict_peak_memory(train.model_copy(update=change), model_config, gpus=gpus, **kwargs).fits(gpu_bytes):
            candidates.append(change)
            break
    if recomputing < layers:
        every_layer: dict[str, Any] = {"gradient_checkpointing": True}
        if train.gradient_checkpointing_layers is not None:
            every_layer["gradient_checkpointing_layers"] = None
        candidates.append(every_layer)
    if train.adapter is None:
        candidates.append({"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True})
    elif not (train.load_in_8bit or train.load_in_4bit):
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
    candidates += [{"gpus": n} for n in more_gpus]
    if not train.gradient_checkpointing:
        candidates += [{"gpus": n, "gradient_checkpointing": True} for n in more_gpus]
    found = []
    for change in candidates:
        try:
            changed = train.model_copy(update={k: v for k, v in change.items() if k != "gpus"})
            plan = predict_peak_memory(changed, model_config, gpus=change.get("gpus", gpus), **kwargs)
        except Exception:  # a combination the config rules refuse (e.g. quantised full fine-tuning)
            continue
        if plan.fits(gpu_bytes):
            found.append(Suggestion(change, plan))
    # One suggestion per kind of change: the least drastic that fits (the first found: the lists go downwards).
    kept, seen = [], set()
    for suggestion in found:
        key = tuple(sorted(k for k in suggestion.change if k != "gradient_accumulation_steps"))
        if key not in seen:
            seen.add(key)
            kept.append(suggestion)
    return kept


# ----- inputs ----------------------------------------------------------------------------------------------------------

def load_model_config(train: TrainConfig) -> KimiLinearConfig:
    """The model config a run would build, read without any weights: init_from_config, or base_model's
    config.json (a local folder, or a hub id already in the Hugging Face cache); a Kimi-Linear-48B-A3B hub id
    that is not downloaded yet uses the release's config (the ``kimi-linear-48b-a3b`` preset)."""
    source = train.init_from_config or train.base_model
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return KimiLinearConfig.from_pretrained(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # not a repo id
        cached = None
    if isinstance(cached, str):
        return KimiLinearConfig.from_pretrained(cached)
    if "kimi-linear-48b-a3b" in source.lower():
        return KimiLinearConfig.preset("kimi-linear-48b-a3b")
    raise ConfigError(f"kimitune plan reads the model's config.json: {path} is not a file and {source!r} is not in "
                      "the Hugging Face cache (download its config.json, or set init_from_config)")


_UNITS = {"": GIB, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": GIB,
          "tib": 2**40}


def parse_memory(text: str) -> float:
    """'80GiB', '80 GB', '81559MiB', '80' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GiB, 141GB or 81559MiB")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def plan_json(plan: MemoryPlan, gpu_bytes: float, suggestions: list[Suggestion]) -> str:
    out = plan.to_dict() | {"gpu_memory_gib": gpu_bytes / GIB, "fits": plan.fits(gpu_bytes),
                            "suggestions": [{"change": s.change, "peak_allocated_gib": s.plan.peak_allocated_gib,
                                             "device_total_gib": s.plan.device_total_gib} for s in suggestions]}
    return json.dumps(out, indent=2)


__all__ = ["MemoryPlan", "MemoryItem", "Suggestion", "predict_peak_memory", "suggest_settings", "load_model_config",
           "parse_memory", "plan_json"]
