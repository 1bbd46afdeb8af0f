"""What a training run's model holds, read from the model itself: ``model_shapes(train, model_config)``.

The model is built on the meta device (``kimitune.model.summary.meta_model``: every module and shape, no memory, no
weights), its parameters listed (``summary.weights``, the list ``kimitune inspect`` counts), then adapted as
training adapts it (every base weight frozen, the run's LoRA applied), and read module by module: the widths of
each decoder layer's attention and feed-forward, its RMS norms, its frozen projection matrices, its adapted linears
(with which tensor each reads: ``dataflow.py``), and which parameters train. Nothing here restates a layer's
shapes from the config.

CE-LoRA is planned as LoRA of the same rank and targets: its Double-LoRA pair and kept rows are computed from the
weights, which a meta model has not got.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kimitune.config import TrainConfig
from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.kda import KimiDeltaAttention
from kimitune.model.modeling import KimiLinearForCausalLM
from kimitune.model.moe import KimiLinearMoE
from kimitune.model.norm import RMSNorm
from kimitune.model.summary import Weight, meta_model, weights
from kimitune.plan.dataflow import Dataflow, dataflow


@dataclass(frozen=True)
class AdaptedLinear:
    """One adapted linear or expert projection: input and output widths, LoRA rank, token copies it computes per
    token (``top_k`` for routed experts, else 1), its adapter's parameters and dropout probability.

    ``reads``: the names of the linears that read its input tensor, a key shared by the adapted linears that keep
    one input between them (an expert projection reads a tensor of its own). ``reads_block_input``: that tensor is
    its block's input (the normed hidden states), which needs no gradient before the first trained parameter.
    """

    name: str
    in_features: int
    out_features: int
    rank: int
    copies: int
    params: int
    dropout: float
    reads: frozenset[str]
    reads_block_input: bool


@dataclass(frozen=True)
class Projection:
    """A projection matrix [out, in] or routed-expert stack [E, out, in] of a decoder layer (what quantisation
    stores, FSDP gathers per layer, and full fine-tuning keeps the input of), and its token copies per token."""

    name: str
    shape: tuple[int, ...]
    copies: int

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class KDAShape:
    """A KDA layer: ``heads`` x ``head_dim`` channels (V = K)."""

    heads: int
    head_dim: int

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class MLAShape:
    """An MLA layer: ``heads``, query/key width per head (nope + rope), value width per head and the latent's width
    (kv_lora_rank)."""

    heads: int
    qk_head_dim: int
    nope_head_dim: int
    v_head_dim: int
    latent_dim: int

    @property
    def latent_and_shared_key(self) -> int:
        """What one token of the latents an MLA layer carries holds: its latent and its shared (rope) key."""
        return self.latent_dim + self.qk_head_dim - self.nope_head_dim


@dataclass(frozen=True)
class MLPShape:
    """A SwiGLU MLP of ``intermediate`` channels."""

    intermediate: int


@dataclass(frozen=True)
class MoEShape:
    """A MoE block: ``experts`` routed SwiGLU experts of ``intermediate`` channels, ``top_k`` per token, the router's
    weight renormalisation, and the shared expert (None without one)."""

    experts: int
    top_k: int
    intermediate: int
    renormalize: bool
    shared: MLPShape | None


# Where in a decoder layer the backward's gradient starts: ops that read no tensor needing a gradient keep nothing,
# so with frozen embeddings nothing before the first trained parameter keeps anything. "input": the layer's input
# needs a gradient (something earlier trains); "attention" / "feed_forward": the first trained parameter is in that
# block; "nothing": nothing up to the layer's end trains.
GradientFrom = Literal["input", "attention", "feed_forward", "nothing"]


@dataclass(frozen=True)
class LayerShapes:
    """One decoder layer as the plan reads it.

    ``input_norm`` / ``post_attention_norm``: widths of the layer's own RMS norms (one row per token each);
    ``attention_norms``: those inside its attention (MLA's latent norms). ``attention_adapted`` /
    ``feed_forward_adapted``: the adapted linears of each block. ``gradient_from``: see ``GradientFrom``.
    """

    index: int
    gradient_from: GradientFrom
    hidden_size: int
    attention: KDAShape | MLAShape
    feed_forward: MLPShape | MoEShape
    input_norm: int
    post_attention_norm: int
    attention_norms: tuple[int, ...]
    attention_adapted: tuple[AdaptedLinear, ...]
    feed_forward_adapted: tuple[AdaptedLinear, ...]
    projections: tuple[Projection, ...]

    @property
    def is_moe(self) -> bool:
        return isinstance(self.feed_forward, MoEShape)

    @property
    def adapted(self) -> tuple[AdaptedLinear, ...]:
        return self.attention_adapted + self.feed_forward_adapted


@dataclass(frozen=True)
class ModelShapes:
    """The whole model: layers, final norm width, parameter counts (``quantizable``: what 8-bit / 4-bit loading
    stores quantised; ``root``: the parameters outside the decoder layers, which FSDP gathers for the step) and
    bytes in the dtypes training holds them in (frozen bf16 base under an adapter, float32 adapters; float32
    everything for full fine-tuning)."""

    hidden_size: int
    vocab_size: int
    final_norm: int
    layers: tuple[LayerShapes, ...]
    total_params: int
    embedding_params: int
    head_params: int
    root_params: int
    quantizable_params: int
    quantizable_rows: int
    largest_quantizable: int  # entries of the largest quantisable tensor (one expert stack)
    largest_quantizable_linear: int  # entries of the largest quantisable projection [out, in] (0: none)
    trainable_params: int
    frozen_bytes: int
    quantizable_bytes: int  # of frozen_bytes, what quantisation replaces
    trainable_bytes: int

    @property
    def adapted(self) -> tuple[AdaptedLinear, ...]:
        return tuple(a for layer in self.layers for a in layer.adapted)


_SHAPES: dict[tuple[str, str], ModelShapes] = {}
TRAINING_DTYPE = torch.bfloat16  # the base weights' dtype under an adapter on a GPU (kimitune.train.setup)


def model_shapes(train: TrainConfig, model_config: KimiLinearConfig) -> ModelShapes:
    """The shapes of ``model_config`` adapted as ``train`` says (once per architecture and adapter setting)."""
    settings = adapter_settings(train)
    key = json.dumps(model_config.to_dict(), sort_keys=True), repr(settings)
    if key not in _SHAPES:
        model = meta_model(model_config)
        table = weights(model)
        if settings is not None:
            from kimitune.adapters.lora import apply_lora

            model.to(TRAINING_DTYPE)  # on the meta device: free
            for param in model.parameters():
                param.requires_grad_(False)
            apply_lora(model, settings)
        _SHAPES[key] = _read(model, table, dataflow(model_config))
    return _SHAPES[key]


def adapter_settings(train: TrainConfig):
    """The run's ``LoraSettings`` as training builds them (CE-LoRA's too), or None for full fine-tuning."""
    if train.adapter is None:
        return None
    from kimitune.train.settings import lora_settings

    return lora_settings(train)


def _read(model: KimiLinearForCausalLM, table: tuple[Weight, ...], flow: Dataflow) -> ModelShapes:
    from kimitune.adapters.lora import lora_modules

    adapters = {id(module): _adapted(name, module, flow) for name, module in lora_modules(model).items()}
    trained = model.model.embed_tokens.weight.requires_grad
    layers = []
    for i, layer in enumerate(model.model.layers):
        layers.append(_layer(i, layer, table, adapters, flow, trained))
        trained = trained or any(p.requires_grad for p in layer.parameters())
    quantizable = [w for w in table if w.quantizable]
    params = dict(model.named_parameters())
    embedding = next(w for w in table if w.kind == "embedding")
    head = next(w for w in table if w.kind == "lm_head")
    return ModelShapes(
        hidden_size=embedding.shape[1],
        vocab_size=embedding.shape[0],
        final_norm=model.model.norm.weight.shape[0],
        layers=tuple(layers),
        total_params=sum(w.numel for w in table),
        embedding_params=embedding.numel,
        head_params=head.numel,
        root_params=sum(w.numel for w in table if w.layer is None),
        quantizable_params=sum(w.numel for w in quantizable),
        quantizable_rows=sum(w.rows for w in quantizable),
        largest_quantizable=max(w.numel for w in quantizable),
        largest_quantizable_linear=max((w.numel for w in quantizable if w.kind == "projection"), default=0),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        frozen_bytes=sum(_bytes(p) for p in model.parameters() if not p.requires_grad),
        quantizable_bytes=sum(_bytes(params[w.name]) for w in quantizable),
        trainable_bytes=sum(_bytes(p) for p in model.parameters() if p.requires_grad),
    )


def _bytes(param: nn.Parameter) -> int:
    return param.numel() * param.element_size()


def _adapted(name: str, module: nn.Module, flow: Dataflow) -> AdaptedLinear:
    """An adapter of ``lora_modules``: a linear's (``lora_A`` [r, in]) or an expert stack's ([E, r, in]), whose
    name is ``<experts module>.<projection>``."""
    stacked = module.lora_A.ndim == 3
    dropout = module.lora_dropout.p if isinstance(module.lora_dropout, nn.Dropout) else 0.0
    return AdaptedLinear(
        name=name,
        in_features=module.in_features,
        out_features=module.out_features,
        rank=module.r,
        copies=flow.rows_per_token[name.rpartition(".")[0]] if stacked else 1,
        params=module.lora_A.numel() + module.lora_B.numel(),
        dropout=dropout,
        reads=frozenset({name}) if stacked else flow.readers[name],
        reads_block_input=name in flow.block_readers,
    )


def _gradient_from(layer: nn.Module, earlier_trains: bool) -> GradientFrom:
    if earlier_trains or layer.input_layernorm.weight.requires_grad:
        return "input"
    for block, where in ((layer.self_attn, "attention"), (layer.post_attention_layernorm, "feed_forward"),
                         (layer.mlp, "feed_forward")):
        if any(p.requires_grad for p in block.parameters()):
            return where
    return "nothing"


def _layer(i: int, layer: nn.Module, table: tuple[Weight, ...], adapters: dict[int, AdaptedLinear],
           flow: Dataflow, earlier_trains: bool) -> LayerShapes:
    """Decoder layer ``i``; ``adapters``: every adapter module's id -> what it adapts."""
    attention, feed_forward = layer.self_attn, layer.mlp

    def adapted_in(block: nn.Module) -> tuple[AdaptedLinear, ...]:
        return tuple(adapters[id(m)] for m in block.modules() if id(m) in adapters)

    projections = tuple(
        Projection(w.name, w.shape, flow.rows_per_token[w.name.rpartition(".")[0]] if w.kind == "experts" else 1)
        for w in table if w.layer == i and w.quantizable)
    return LayerShapes(
        index=i,
        gradient_from=_gradient_from(layer, earlier_trains),
        hidden_size=layer.input_layernorm.weight.shape[0],
        attention=_attention_shape(attention),
        feed_forward=_feed_forward_shape(feed_forward),
        input_norm=layer.input_layernorm.weight.shape[0],
        post_attention_norm=layer.post_attention_layernorm.weight.shape[0],
        attention_norms=tuple(m.weight.shape[0] for m in attention.modules() if isinstance(m, RMSNorm)),
        attention_adapted=adapted_in(attention),
        feed_forward_adapted=adapted_in(feed_forward),
        projections=projections,
    )


def _attention_shape(attention: nn.Module) -> KDAShape | MLAShape:
    if isinstance(attention, KimiDeltaAttention):
        return KDAShape(attention.num_heads, attention.head_dim)
    return MLAShape(attention.num_heads, attention.nope_dim + attention.rope_dim, attention.nope_dim,
                    attention.v_dim, attention.kv_lora_rank)


def _mlp_shape(mlp: nn.Module) -> MLPShape:
    return MLPShape(mlp.gate_proj.out_features)


def _feed_forward_shape(feed_forward: nn.Module) -> MLPShape | MoEShape:
    if not isinstance(feed_forward, KimiLinearMoE):
        return _mlp_shape(feed_forward)
    shared = feed_forward.shared_experts
    return MoEShape(
        experts=feed_forward.num_experts,
        top_k=feed_forward.top_k,
        intermediate=feed_forward.experts.gate_up_proj.shape[1] // 2,  # [E, gate rows then up rows, C]
        renormalize=feed_forward.gate.renormalize,
        shared=None if shared is None else _mlp_shape(shared),
    )
