"""Kimi Linear causal LM: decoder layers (KDA or MLA, then dense MLP or MoE), the LM head and the loss.

Module and parameter names are those of transformers' ``KimiLinearForCausalLM`` (see docs/architecture.md), so
state dicts and PEFT adapter names are interchangeable; ``kimitune.model.checkpoint`` maps them to the release's
file layout.

Batches are either right-padded [B, T] (labels -100 on pads; causal layers never let a real token see a later
pad) or packed: [1, total] with ``cu_seqlens`` (int32 [n + 1], from 0 to total), where every layer keeps the
sequences apart and the last token of a sequence is never asked to predict the first token of the next.
``cu_seqlens`` may stay on the CPU when the model runs on a GPU (what kimitune.ops prefers: no host syncs): the forward
makes it a ``BatchLayout`` once (kimitune/ops/batch_layout.py: the bounds on the device and the host, each token's
position, the longest length) and passes that one object to every layer; a caller may pass a layout it built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.context_parallel import RowShare, layer_across_ranks, share_of_row, whole_row_routers
from kimitune.model.kda import KDAForgetGate, KDAState, KimiDeltaAttention
from kimitune.model.mla import MLAState, MultiheadLatentAttention
from kimitune.model.moe import (
    GroupedExperts,
    KimiLinearMLP,
    KimiLinearMoE,
    RouterTerms,
    TopkRouter,
    load_balancing_loss,
)
from kimitune.model.norm import GatedRMSNorm, RMSNorm
from kimitune.model.options import RunOptions
from kimitune.model.pieces import checkpointed, layer_in_pieces
from kimitune.model.shared_prompts import PromptSplit, layer_after_prompts
from kimitune.model.tiled_mlp import tiled_feed_forward
from kimitune.ops import BatchLayout
from kimitune.ops.loss import IGNORE_INDEX, REDUCTIONS, LossRows, linear_cross_entropy


@dataclass
class KimiLinearCache:
    """Per-layer states carried from one forward call to the next (prefill, then decode): unpacked batches only.

    ``states[i]`` is a ``KDAState`` (conv + recurrent state) for KDA layers and an ``MLAState`` (latents so far)
    for MLA layers; an empty cache starts every sequence from the beginning.
    """

    states: dict[int, KDAState | MLAState] = field(default_factory=dict)


@dataclass
class KimiLinearOutput:
    """What the forward returns.

    loss: float32 scalar (None without labels). logits: [B, T, V] (None with ``return_logits=False``).
    aux_loss: the options' (else the config's) ``router_aux_loss_coef`` * the load-balancing loss averaged over the MoE
    layers; not included in ``loss``; None when the coefficient is 0.
    router_stats: tokens routed to each expert, int64 [num_moe_layers, E]. cache: the cache passed in, updated.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_stats: torch.Tensor | None = None
    cache: KimiLinearCache | None = None


class KimiLinearDecoderLayer(nn.Module):
    """h [B, T, C] -> h + attn(norm(h)), then + mlp(norm(h))."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_kda = config.is_kda_layer(layer_idx)
        self.self_attn = (
            KimiDeltaAttention(config) if self.is_kda else MultiheadLatentAttention(config)
        )
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = (
            KimiLinearMoE(config) if self.is_moe else KimiLinearMLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        layout: BatchLayout | None = None,
        state: KDAState | MLAState | None = None,
        return_state: bool = False,
        options: RunOptions = RunOptions(),
        cp_context=None,
    ) -> tuple[torch.Tensor, RouterTerms | None, KDAState | MLAState | None]:
        """-> (h, the MoE's routing terms (None for dense layers), new state or None). ``cp_context``: fla's context
        parallelism for a KDA layer on this rank's tokens (model/context_parallel.py); an MLA layer takes none."""
        h, new_state = self.attend(h, layout, state, return_state, options, cp_context)
        h, router = self.feed_forward(h, options)
        return h, router, new_state

    def attend(self, h: torch.Tensor, layout: BatchLayout | None = None, state: KDAState | MLAState | None = None,
               return_state: bool = False, options: RunOptions = RunOptions(),
               cp_context=None) -> tuple[torch.Tensor, KDAState | MLAState | None]:
        """The layer's first half, h [B, T, C] -> (h + attn(norm(h)), new state or None): the part that mixes
        tokens."""
        if cp_context is not None and not self.is_kda:
            raise ValueError("cp_context is fla's context parallelism for KDA layers: an MLA layer takes none")
        attention_options = {"keep_intermediates": options.kda_keep_intermediates} if self.is_kda else {}
        if cp_context is not None:
            attention_options["cp_context"] = cp_context
        attn_out, new_state = self.self_attn(self.input_layernorm(h), layout, state, return_state, **attention_options)
        return h + attn_out, new_state

    def feed_forward(self, h: torch.Tensor, options: RunOptions = RunOptions()) -> tuple[torch.Tensor,
                                                                                        RouterTerms | None]:
        """The layer's second half, token by token: h [B, T, C] -> (h + mlp(norm(h)), the MoE's routing terms or
        None)."""
        mlp_in = self.post_attention_layernorm(h)
        if options.mlp_shards != 1 and torch.is_grad_enabled():  # nothing to save without gradients
            out, router = tiled_feed_forward(self.mlp, mlp_in, options.mlp_shards)
            return h + out, router
        if not self.is_moe:
            return h + self.mlp(mlp_in), None
        moe = self.mlp(mlp_in)
        return h + moe.hidden, moe.router


class KimiLinearModel(nn.Module):
    """input_ids [B, T] -> final-normed hidden states [B, T, C] (plus router statistics)."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        layout: BatchLayout | None = None,
        cache: KimiLinearCache | None = None,
        options: RunOptions = RunOptions(),
        share: RowShare | None = None,
    ) -> tuple[torch.Tensor, list[RouterTerms]]:
        """-> (hidden [B, T, C], the routing terms of each MoE layer). ``share``: under context parallelism, the
        row's split over the ranks (``input_ids`` and ``layout`` are this rank's piece; the routing terms returned
        are the whole row's)."""
        h = self.embed_tokens(input_ids)
        recompute = options.recompute_layers if torch.is_grad_enabled() and cache is None else frozenset()
        segment = options.segment_layers
        if share is not None:
            routers = []
            for i, layer in enumerate(self.layers):
                h, router = layer_across_ranks(layer, h, share, options, i in recompute)
                if router is not None:
                    routers.append(router)
            return self.norm(h), whole_row_routers(routers, share)
        if options.prompt_sequences:  # preference pairs' prompts computed once (model/shared_prompts.py)
            split = PromptSplit.of(layout, options.prompt_sequences, h.device)
            routers = []
            for i, layer in enumerate(self.layers):
                h, router = checkpointed(i in recompute)(layer_after_prompts, layer, h, split, options,
                                                         use_reentrant=False)
                if router is not None:
                    routers.append(router)
            return self.norm(h), routers
        if segment > 1 and recompute:
            if len(recompute) < len(self.layers):
                raise ValueError("segment_layers needs every decoder layer recomputed")
            routers = []
            for start in range(0, len(self.layers), segment):  # only each segment's input is kept
                h, more = checkpoint(self._run_layers, h, layout, None, options, recompute, start,
                                     min(start + segment, len(self.layers)), use_reentrant=False)
                routers += more
        else:
            h, routers = self._run_layers(h, layout, cache, options, recompute, 0, len(self.layers))
        return self.norm(h), routers

    def _run_layers(self, h: torch.Tensor, layout: BatchLayout | None, cache: KimiLinearCache | None,
                    options: RunOptions, recompute: frozenset[int], start: int,
                    end: int) -> tuple[torch.Tensor, list[RouterTerms]]:
        """Decoder layers start .. end - 1 on h [B, T, C] -> (h, their routing terms)."""
        routers = []
        piece_len = options.sequence_piece_len
        # In pieces: the recomputed layers, and every layer of a pass without gradients (evaluation)
        in_pieces = bool(piece_len) and h.shape[1] > piece_len and cache is None
        for i in range(start, end):
            layer = self.layers[i]
            if in_pieces and (i in recompute or not torch.is_grad_enabled()):
                h, router = layer_in_pieces(layer, h, layout, piece_len, options)
            elif i in recompute:
                h, router, _ = checkpoint(layer, h, layout, None, False, options, use_reentrant=False)
            elif cache is not None:
                h, router, cache.states[i] = layer(h, layout, cache.states.get(i), True, options)
            else:
                h, router, _ = layer(h, layout, options=options)
            if router is not None:
                routers.append(router)
        return h, routers


def checkpointed_layer_indices(num_layers: int, count: int) -> list[int]:
    """The ``count`` of ``num_layers`` decoder layers that recompute, spread evenly (one in the middle of the
    stack for 1, every layer for ``num_layers``).

    Spread rather than the first or last ones, so that FSDP's per-layer gathers and the backward's memory peak
    (the layers kept whole before the first recomputed one) stay level.
    """
    return sorted({int((j + 0.5) * num_layers / count) for j in range(count)}) if count else []


def shift_labels(labels: torch.Tensor, layout: BatchLayout | torch.Tensor | None) -> torch.Tensor:
    """labels [B, T] -> targets [B, T]: position t predicts labels[t + 1]; the last position of every (packed)
    sequence predicts nothing (-100)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    layout = BatchLayout.of(layout, labels.device, labels.shape[1])
    if layout is not None:
        targets = targets.index_fill(1, layout.last_tokens, IGNORE_INDEX)
    return targets


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """transformers' initialisation: normal(std) matrices, unit norms, zero router bias, fla's decay init; the
    short conv keeps nn.Conv1d's default (as fla's ShortConvolution)."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, (RMSNorm, GatedRMSNorm)):
        module.weight.fill_(1.0)
    elif isinstance(module, GroupedExperts):
        module.gate_up_proj.normal_(0.0, std)
        module.down_proj.normal_(0.0, std)
    elif isinstance(module, TopkRouter):
        module.weight.normal_(0.0, std)
        module.e_score_correction_bias.zero_()
    elif isinstance(module, KDAForgetGate):
        module.reset_parameters()


class KimiLinearForCausalLM(nn.Module):
    """The Kimi Linear causal language model. ``model.*`` and ``lm_head`` as in transformers."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(lambda module: init_weights(module, config.initializer_range))

    # ----- loading and saving (kimitune.model.checkpoint) -----
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KimiLinearForCausalLM:
        """Loads a release-layout folder (config.json + safetensors); see ``checkpoint.load_pretrained``
        (quantised while loading: ``kimitune.quant.load_quantized``)."""
        from kimitune.model.checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB") -> Path:
        """Writes the release layout (config.json + sharded safetensors); see ``checkpoint.save_pretrained``."""
        from kimitune.model.checkpoint import save_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size)

    def recomputed_layers(self, count: int | None = None) -> frozenset[int]:
        """The decoder layers ``RunOptions.recompute_layers`` names to recompute every layer (``count`` None) or
        ``count`` of them spread evenly over the stack (``checkpointed_layer_indices``)."""
        total = len(self.model.layers)
        if count is not None and not 1 <= count <= total:
            raise ValueError(f"gradient_checkpointing_layers: {count} is not between 1 and the model's {total} "
                             "decoder layers")
        return frozenset(checkpointed_layer_indices(total, total if count is None else count))

    # ----- forward -----
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | BatchLayout | None = None,
        cache: KimiLinearCache | None = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
        options: RunOptions | None = None,
    ) -> KimiLinearOutput:
        """input_ids [B, T]; labels [B, T] unshifted, -100 = no loss; cu_seqlens int32 [n + 1] with B == 1, or the
        batch's ``BatchLayout``; ``options``: how the pass runs (``RunOptions``; None: the defaults).

        The loss is the mean (or sum, ``loss_reduction="sum"``) over the shifted labels != -100 of the token
        cross-entropy, or each token's, float32 [B * T] with 0 where nothing is predicted (``"none"``: position t's
        loss is that of predicting token t + 1); with ``return_logits=False`` it is computed without materialising
        the [B * T, V] logits. With ``options.context_parallel`` (a process group) every rank passes the whole row
        and gets its share: the loss (``"sum"`` or ``"none"``) and logits of its piece of the row, its share of the
        load-balancing loss (model/context_parallel.py).
        """
        options = options or RunOptions()
        self._check_inputs(input_ids, labels, cu_seqlens, cache, return_logits, loss_reduction)
        layout = BatchLayout.of(cu_seqlens, input_ids.device, input_ids.shape[1])  # once, for every layer
        targets = None if labels is None else shift_labels(labels, layout)
        share = None
        if options.prompt_sequences and (cache is not None or options.context_parallel is not None or
                                         options.sequence_piece_len or options.segment_layers > 1):
            raise ValueError("prompt_sequences (shared prompts) runs whole rows on one process: no cache, context "
                             "parallelism, sequence_piece_len or segment_layers with it")
        if options.context_parallel is not None:  # this rank's piece of the row (model/context_parallel.py)
            self._check_context_parallel(cache, loss_reduction, options)
            share = share_of_row(layout, input_ids.shape[1], options.context_parallel, input_ids.device,
                                 rows=input_ids.shape[0], conv_kernel_size=self.config.kda_short_conv_kernel_size)
            piece = share.piece
            input_ids, layout = input_ids[:, piece.start:piece.end], piece.layout
            targets = None if targets is None else targets[:, piece.start:piece.end]
        targets = None if targets is None else targets.reshape(-1)
        # Started before the layers, so that the loss finds its rows without waiting for the GPU (LossRows).
        fused_loss = targets is not None and not return_logits and options.loss_impl == "fused"
        loss_rows = LossRows(targets) if fused_loss else None
        hidden, routers = self.model(input_ids, layout, cache, options, share)
        out = KimiLinearOutput(cache=cache)
        if return_logits:
            out.logits = self.lm_head(hidden)
            if targets is not None:
                out.loss = F.cross_entropy(
                    out.logits.float().view(-1, out.logits.shape[-1]),
                    targets,
                    ignore_index=IGNORE_INDEX,
                    reduction=loss_reduction,
                )
        else:
            out.loss = linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets, reduction=loss_reduction,
                impl=options.loss_impl, loss_rows=loss_rows,
            )
        if routers:
            out.router_stats = torch.stack([router.tokens_per_expert for router in routers])
        out.aux_loss = load_balancing_loss(routers, options.aux_loss_coef(self.config))
        if share is not None and out.aux_loss is not None:
            out.aux_loss = out.aux_loss / share.ranks  # every rank has the whole row's: its share, to be summed
        return out

    @staticmethod
    def _check_context_parallel(cache, loss_reduction: str, options: RunOptions) -> None:
        if cache is not None:
            raise ValueError("context parallelism splits a training row: it takes no cache")
        if loss_reduction == "mean":
            raise ValueError("context parallelism gives each rank's share of the loss: loss_reduction 'sum' or "
                             "'none' (the caller divides by the row's count)")
        if options.sequence_piece_len or options.segment_layers > 1:
            raise ValueError("context parallelism does not run layers in pieces within a rank yet: drop "
                             "sequence_piece_len and segment_layers")

    def _check_inputs(self, input_ids, labels, cu_seqlens, cache, return_logits, loss_reduction) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False computes only the loss: it needs labels")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
        if cu_seqlens is None:
            return
        if isinstance(cu_seqlens, BatchLayout):  # the caller's own layout: its tensor form is checked
            cu_seqlens = cu_seqlens.checked_bounds
        if cache is not None:
            raise ValueError("a cache works with unpacked batches only: pass cu_seqlens=None with a cache")
        if input_ids.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: input_ids must be [1, total], got "
                             f"{tuple(input_ids.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be int32 [num_sequences + 1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if cu_seqlens.device.type == "cpu":  # the value checks would cost a host sync elsewhere
            bounds = cu_seqlens.tolist()
            falls = any(later < earlier for earlier, later in zip(bounds, bounds[1:]))
            if bounds[0] != 0 or bounds[-1] != input_ids.shape[1] or falls:
                raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens ({input_ids.shape[1]}), "
                                 f"got {bounds}")
