"""Multi-head latent attention without RoPE: the full-attention layers of Kimi Linear.

    q                 = q_proj(x)  or  q_b_proj(q_a_layernorm(q_a_proj(x)))     [B, H, T, nope + rope]
    latent, k_shared  = kv_a_proj_with_mqa(x)                                   [B, T, kv_lora_rank], [B, T, rope]
    k_nope, v         = kv_b_proj(kv_a_layernorm(latent))                       per head
    k                 = [k_nope, k_shared broadcast over heads]                 the "rope" part stays un-rotated
    y                 = o_proj(softmax(q k^T / sqrt(nope + rope)) v)           causal

As in transformers and the release, the latent norms use eps 1e-6 (not rms_norm_eps). With ``cu_seqlens`` (B == 1)
each packed sequence attends only to itself (kimitune.ops.attention: flash attention's varlen kernel on CUDA). With
an ``MLAState`` the layer attends over the cached latents too and returns them extended by its input (prefill, then
decode). A decode step (one new token per row, no autograd) attends in the latent space instead of expanding every
cached latent through kv_b_proj (``_absorbed_attention``), so its cost grows with S * (kv_lora_rank + rope) per
head, not S * kv_lora_rank * heads * (nope + v).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.projections import project_shared_input
from kimitune.model.norm import RMSNorm
from kimitune.ops.attention import causal_attention, packed_causal_attention
from kimitune.ops.batch_layout import BatchLayout
from kimitune.ops.prefix_attention import prefix_attention

LATENT_NORM_EPS = 1e-6


# Attention while generating: every prefill and every decode step brings a new length, and cuDNN's attention (which
# sdpa prefers on Hopper) builds an execution plan for each new length, which costs far more host time than the
# step's GPU work (benchmarks/RESULTS.md, "cuDNN plans while decoding"). The other backends take any length as it
# comes.
_CACHED_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class MLAState:
    """The normalised latents seen so far: latent [B, S, kv_lora_rank] and shared key [B, S, qk_rope_head_dim].

    ``valid`` [B, S] bool marks the real entries when the rows hold different numbers of tokens (None: all are).
    The layer has no position encoding, so a row's entries may have gaps: attention only needs the set of keys.
    """

    latent: torch.Tensor
    k_shared: torch.Tensor
    valid: torch.Tensor | None = None


@dataclass
class MLAPrefix:
    """The earlier tokens of a long row computed in pieces (model/pieces.py), as the pieces' own latents: a list of
    (latent [B, S_j, kv_lora_rank], shared key [B, S_j, qk_rope_head_dim]). Every query of the row (packed: of the
    piece's first sequence, the one that began earlier) sees them all; they are expanded into keys and values one
    block at a time (``kimitune.ops.prefix_attention``). The layer then returns its input's own latents."""

    blocks: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SequencePrefixes:
    """Each packed sequence's own earlier tokens (model/shared_prompts.py: replies after their shared prompt):
    latents [1, S, kv_lora_rank] and shared keys [1, S, qk_rope_head_dim] of the earlier tokens, and for each
    sequence of the input the span (start, end) of them that precedes it ((0, 0): none). Each sequence's queries
    attend over its span, then causally over its own tokens."""

    latent: torch.Tensor
    k_shared: torch.Tensor
    spans: list[tuple[int, int]]


@dataclass
class SharedAttention:
    """The attention of this input's queries computed with other processes (context parallelism,
    model/context_parallel.py): ``attend(layer, q, latent, k_shared)`` -> (out [B, H, T, v], tie), given the
    layer, its queries q [B, H, T, nope + rope] and this input's normalised latents [B, T, rank] and shared keys
    [B, T, rope]; ``tie`` is a zero scalar the layer adds to its output, so that every rank's backward reaches the
    collectives inside ``attend``, whether or not its own queries used what they brought. ``attend`` calls
    ``layer.attention_over`` for each block of queries it computes."""

    attend: Callable[..., tuple[torch.Tensor, torch.Tensor]]


class MultiheadLatentAttention(nn.Module):
    """x [B, T, C] -> [B, T, C]. Parameter names are transformers' KimiLinearAttention's."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scaling = config.qk_head_dim**-0.5
        q_width = self.num_heads * config.qk_head_dim
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=False)
        self._kv_b_split: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # see _absorbed_weights

    def _query_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (q [B, T, H * (nope + rope)], kv_a_proj_with_mqa(x)): x's two projections, together."""
        if self.q_lora_rank is None:
            return project_shared_input(x, self.q_proj, self.kv_a_proj_with_mqa)
        q_a, kv_a = project_shared_input(x, self.q_a_proj, self.kv_a_proj_with_mqa)
        return self.q_b_proj(self.q_a_layernorm(q_a)), kv_a

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: BatchLayout | torch.Tensor | None = None,
        state: MLAState | MLAPrefix | SequencePrefixes | SharedAttention | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, MLAState | None]:
        """x [B, T, C] -> (y [B, T, C], the latents including this input when ``return_state`` else None; after an
        ``MLAPrefix``, this input's own latents; with ``SequencePrefixes`` or ``SharedAttention``, None)."""
        B, T, _ = x.shape
        q, kv_a = self._query_and_latent(x)
        q = q.view(B, T, self.num_heads, -1).transpose(1, 2)
        latent, k_shared = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        tie = None
        valid = None
        if isinstance(state, SharedAttention):
            out, tie = state.attend(self, q, latent, k_shared)
            return_state = False
        elif isinstance(state, SequencePrefixes):
            out = self._attention_after_spans(q, latent, k_shared, state, BatchLayout.of(cu_seqlens, x.device, T))
            return_state = False
        elif isinstance(state, MLAPrefix):
            out = self._attention_after_prefix(q, latent, k_shared, state, BatchLayout.of(cu_seqlens, x.device, T))
        else:
            if state is not None:
                latent = torch.cat([state.latent, latent.to(state.latent.dtype)], dim=1)
                k_shared = torch.cat([state.k_shared, k_shared.to(state.k_shared.dtype)], dim=1)
                if state.valid is not None:
                    valid = F.pad(state.valid, (0, T), value=True)
            if T == 1 and state is not None and not torch.is_grad_enabled():  # a decode step
                out = self._absorbed_attention(q, latent, k_shared, valid).to(latent.dtype)
            else:
                out = self._expanded_attention(q, latent, k_shared, valid, cu_seqlens, return_state)
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        if tie is not None:
            y = y + tie.to(y.dtype)
        return y, (MLAState(latent, k_shared, valid) if return_state else None)

    def _expand(self, latent: torch.Tensor, k_shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B, S, rank], k_shared [B, S, rope] -> per-head keys [B, H, S, nope + rope] and values
        [B, H, S, v] through kv_b_proj."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_shared_heads = k_shared[:, None].expand(B, self.num_heads, S, self.rope_dim).to(k_nope.dtype)
        return torch.cat([k_nope, k_shared_heads], dim=-1), v

    def attention_over(self, q: torch.Tensor, latent: torch.Tensor, k_shared: torch.Tensor,
                       blocks: list[tuple[torch.Tensor, torch.Tensor]], layout: BatchLayout | None) -> torch.Tensor:
        """Queries q [B, H, T, nope + rope] of T consecutive tokens over their own latents [B, T, rank] and shared
        keys [B, T, rope] (causal; packed: each sequence of ``layout`` its own) and, for those that continue an
        earlier sequence, over the earlier ``blocks`` (``MLAPrefix``'s form) -> [B, H, T, v]."""
        if blocks:
            return self._attention_after_prefix(q, latent, k_shared, MLAPrefix(blocks), layout)
        return self._expanded_attention(q, latent, k_shared, None, layout, False)

    def _attention_after_spans(self, q: torch.Tensor, latent: torch.Tensor, k_shared: torch.Tensor,
                               prefixes: SequencePrefixes, layout: BatchLayout | None) -> torch.Tensor:
        """Each packed sequence of ``layout`` over its span of ``prefixes``, then its own tokens -> [1, H, T, v]."""
        bounds = [0, q.shape[2]] if layout is None else layout.host_bounds.tolist()
        if len(prefixes.spans) != len(bounds) - 1:
            raise ValueError(f"SequencePrefixes: {len(prefixes.spans)} spans for {len(bounds) - 1} sequences")
        outputs = []
        for (start, end), (a, b) in zip(zip(bounds[:-1], bounds[1:]), prefixes.spans):
            blocks = [(prefixes.latent[:, a:b], prefixes.k_shared[:, a:b])] if b > a else []
            outputs.append(self.attention_over(q[:, :, start:end], latent[:, start:end], k_shared[:, start:end],
                                               blocks, None))
        return torch.cat(outputs, dim=2)

    def _attention_after_prefix(self, q: torch.Tensor, latent: torch.Tensor, k_shared: torch.Tensor,
                                prefix: MLAPrefix, layout: BatchLayout | None) -> torch.Tensor:
        """The T queries over their own tokens (causal; packed: each sequence its own) and, for those that continue
        an earlier sequence (unpacked: all; packed: the first sequence's), over the prefix -> [B, H, T, v]."""
        k, v = self._expand(latent, k_shared)
        q = q.to(k.dtype)
        params = [p for p in self.kv_b_proj.parameters() if p.requires_grad]
        if layout is None:
            return prefix_attention(q, k, v, prefix.blocks, self._expand, params, self.scaling)
        bounds = layout.host_bounds
        first = int(bounds[1])
        out = prefix_attention(q[:, :, :first], k[:, :, :first], v[:, :, :first], prefix.blocks, self._expand,
                               params, self.scaling)
        if first == q.shape[2]:
            return out
        rest = BatchLayout.of((bounds[1:] - first).to(torch.int32), q.device, q.shape[2] - first)
        tail = packed_causal_attention(q[:, :, first:], k[:, :, first:], v[:, :, first:], rest, self.scaling)
        return torch.cat([out, tail], dim=2)

    def _expanded_attention(self, q: torch.Tensor, latent: torch.Tensor, k_shared: torch.Tensor,
                            valid: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                            return_state: bool) -> torch.Tensor:
        """The T queries over all S latents, each expanded through kv_b_proj into per-head keys and values.

        q [B, H, T, nope + rope], latent [B, S, rank], k_shared [B, S, rope], valid [B, S] or None -> [B, H, T, v].
        The last T latents are the queries' own tokens.
        """
        B, _, T, _ = q.shape
        S = latent.shape[1]
        k, v = self._expand(latent, k_shared)
        q = q.to(k.dtype)
        if cu_seqlens is not None:
            return packed_causal_attention(q, k, v, cu_seqlens, self.scaling)
        if S == T and not return_state:  # training: one length per step, where sdpa's first choice is fastest
            return causal_attention(q, k, v, self.scaling)
        with sdpa_kernel(_CACHED_ATTENTION_BACKENDS):
            if valid is None:  # a prefill, or T new tokens after S - T cached ones (query t sees keys 0 .. S - T + t)
                return causal_attention(q, k, v, self.scaling)
            mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
            mask = mask & valid[:, None, None, :]  # [B, 1, T, S]: rows of different lengths
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)

    def _absorbed_attention(self, q: torch.Tensor, latent: torch.Tensor, k_shared: torch.Tensor,
                            valid: torch.Tensor | None) -> torch.Tensor:
        """One query per row over all S cached entries, in the latent space -> [B, H, 1, v].

        q [B, H, 1, nope + rope], latent [B, S, rank], k_shared [B, S, rope], valid [B, S] or None. With kv_b_proj's
        weight split per head into W_UK [H, nope, rank] and W_UV [H, v, rank]: q_nope . (W_UK latent) =
        (q_nope W_UK) . latent, and sum_s p_s W_UV latent_s = W_UV (sum_s p_s latent_s). Scores and the softmax
        are float32, as inside the fused attention kernels.
        """
        B, H, T, _ = q.shape
        w_uk, w_uv = self._absorbed_weights(latent)
        q_nope, q_rope = q.float().split([self.nope_dim, self.rope_dim], dim=-1)
        query = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope], dim=-1)  # [B, H, T, rank + rope]
        keys = torch.cat([latent, k_shared.to(latent.dtype)], dim=-1).float()  # [B, S, rank + rope], all heads'
        # Heads as rows of one product per sequence: broadcasting keys over a head dimension would copy them H times.
        scores = torch.bmm(query.reshape(B, H * T, -1), keys.transpose(1, 2)) * self.scaling  # [B, H*T, S]
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        mixed = torch.bmm(scores.softmax(dim=-1), keys[..., : self.kv_lora_rank])  # [B, H*T, rank]
        return torch.einsum("bhtr,hvr->bhtv", mixed.view(B, H, T, -1), w_uv)

    def _absorbed_weights(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's effective weight as float32 (W_UK [H, nope, rank], W_UV [H, v, rank]), kept until one of
        its tensors changes. Read as kv_b_proj(identity), so an adapter, a quantised weight or a merged one all
        give what the layer itself computes."""
        tensors = [*self.kv_b_proj.parameters(), *self.kv_b_proj.buffers()]
        key = tuple((t.data_ptr(), _version(t)) for t in tensors) + (latent.dtype, latent.device)
        if self._kv_b_split is None or self._kv_b_split[0] != key:
            identity = torch.eye(self.kv_lora_rank, dtype=latent.dtype, device=latent.device)
            weight = self.kv_b_proj(identity).float().t()  # [H * (nope + v), rank]
            weight = weight.reshape(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_uk, w_uv = weight.split([self.nope_dim, self.v_dim], dim=1)
            self._kv_b_split = (key, w_uk.contiguous(), w_uv.contiguous())
        return self._kv_b_split[1], self._kv_b_split[2]


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification counter; -1 for inference-mode tensors, which keep none."""
    try:
        return tensor._version
    except RuntimeError:
        return -1
