"""A decoder layer computed in pieces along the sequence: the long-context training step.

A layer's activations grow with the tokens it sees at once. Computed piece by piece (``RunOptions.sequence_piece_len``
tokens each, the last piece shorter), each piece recomputed in the backward (torch.utils.checkpoint), only one
piece's activations are alive at a time, and what passes from piece to piece is small:

- a KDA layer's short-conv state [N, D, W] and recurrent state [N, H, K, V] (the ops take them as initial states);
- an MLA layer's normalised latents: each piece attends over the latents of the earlier pieces of its sequences,
  expanded into keys and values one block (an earlier piece) at a time (``kimitune.ops.prefix_attention``);
- MoE and MLP blocks are token-wise, so the pieces tile them too; their routing terms add up (``RouterTerms``).

The result equals the whole layer's, loss and every gradient (the states carry gradients back to earlier pieces),
packed or not: a packed sequence cut by a piece boundary continues from its state, one that begins inside a piece
starts from zeros, and MLA queries see only their own sequence's earlier latents.

    h [B, T, C] -> (layer(h) [B, T, C], RouterTerms of its MoE or None)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimitune.model.kda import KDAState
from kimitune.model.mla import MLAPrefix
from kimitune.model.moe import RouterTerms
from kimitune.model.options import RunOptions
from kimitune.ops import BatchLayout


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of the row. layout: the piece's own bounds (packed batches; None for unpacked rows).
    continues: its first sequence began in an earlier piece, at ``first_start``. carries: its last sequence goes
    on into the next piece."""

    start: int
    end: int
    layout: BatchLayout | None
    continues: bool
    carries: bool
    first_start: int


def split_into_pieces(layout: BatchLayout | None, total: int, piece_len: int, device: torch.device) -> list[Piece]:
    """The row's tokens in pieces of ``piece_len`` (the last one shorter), each with its local layout. A packed
    row's pieces are cut once and kept with its layout: every layer, and every recomputation, gets the same local
    layouts, whose device bounds and fla chunk tables are then made once per batch."""
    if piece_len < 1:
        raise ValueError(f"sequence_piece_len must be at least 1, got {piece_len}")
    cuts = list(range(0, total, piece_len)) + [total]
    if layout is None:
        return [Piece(s, e, None, s > 0, e < total, 0) for s, e in zip(cuts, cuts[1:])]
    key = f"pieces of {piece_len} of {total} tokens on {device}"
    if key not in layout.__dict__:  # the layout is frozen; its cached forms live in its __dict__
        layout.__dict__[key] = _packed_pieces(layout, cuts, device)
    return layout.__dict__[key]


def _packed_pieces(layout: BatchLayout, cuts: list[int], device: torch.device) -> list[Piece]:
    bounds = layout.host_bounds.tolist()
    starts = set(bounds)
    pieces = []
    for s, e in zip(cuts, cuts[1:]):
        local = [0] + [b - s for b in bounds if s < b < e] + [e - s]
        first_start = max(b for b in bounds if b <= s)
        bounds_cpu = torch.tensor(local, dtype=torch.int32)
        pieces.append(Piece(s, e, BatchLayout.of(bounds_cpu, device, e - s), s not in starts, e not in starts,
                            first_start))
    return pieces


def initial_states(carried: torch.Tensor | None, sequences: int, packed: bool) -> torch.Tensor | None:
    """Initial states [N, ...] for a piece's N sequences: the carried state [1, ...] for the first, zeros for the
    rest (packed); the carried states of every row (unpacked); None when nothing is carried."""
    if carried is None or not packed or sequences == 1:
        return carried
    return torch.cat([carried, carried.new_zeros(sequences - 1, *carried.shape[1:])])


def run_kda_piece(layer: nn.Module, h: torch.Tensor, layout: BatchLayout | None, conv: torch.Tensor | None,
                   recurrent: torch.Tensor | None, return_state: bool, options: RunOptions):
    """A KDA layer on one piece h [B, P, C] from initial states (None: zeros) -> (out, its MoE's tokens per expert
    and score sum (None, None for a dense layer), the conv and recurrent states that its last sequence (packed) or
    its rows carry on (None, None unless ``return_state``))."""
    state = None if conv is None else KDAState(conv, recurrent)
    out, router, new_state = layer(h, layout, state, return_state, options)
    carry = (new_state.conv[-1:], new_state.recurrent[-1:]) if layout is not None and return_state else \
        ((new_state.conv, new_state.recurrent) if return_state else (None, None))
    return (out, *router_tensors(router), *carry)


def _run_mla_piece(layer: nn.Module, h: torch.Tensor, layout: BatchLayout | None, latents: list[torch.Tensor],
                   k_shared: list[torch.Tensor], return_state: bool, options: RunOptions):
    state = MLAPrefix(list(zip(latents, k_shared))) if latents else None
    out, router, new_state = layer(h, layout, state, return_state, options)
    # this piece's own latents; the shared key is a view of its projection's output, which it would keep alive
    own = (new_state.latent, new_state.k_shared.contiguous()) if return_state else (None, None)
    return (out, *router_tensors(router), *own)


def _call(fn, *args, use_reentrant: bool):
    return fn(*args)


def checkpointed(recompute: bool):
    """``torch.utils.checkpoint.checkpoint`` when ``recompute``, else a plain call with the same signature."""
    return checkpoint if recompute else _call


def router_tensors(router: RouterTerms | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A MoE layer's (tokens per expert, score sum) as tensors to return from a checkpointed piece; None for dense."""
    return (None, None) if router is None else (router.tokens_per_expert, router.score_sum)


def layer_in_pieces(layer: nn.Module, h: torch.Tensor, layout: BatchLayout | None, piece_len: int,
                    options: RunOptions) -> tuple[torch.Tensor, RouterTerms | None]:
    """``layer``'s output for ``h`` [B, T, C] computed in pieces (the module docstring); each piece recomputes in
    the backward. Without gradients the pieces only bound the working memory (long evaluations)."""
    B, T, _ = h.shape
    pieces = split_into_pieces(layout, T, piece_len, h.device)
    # Without gradients (evaluation) nothing is saved, so nothing needs recomputing
    run = checkpointed(torch.is_grad_enabled())
    packed = layout is not None
    outputs, router = [], None
    conv = recurrent = None  # KDA: the carried states of the sequence that goes on
    latents, k_shared, spans = [], [], []  # MLA: each earlier piece's own latents and token span
    for index, piece in enumerate(pieces):
        h_piece = h[:, piece.start:piece.end]
        sequences = 1 if not packed else piece.layout.cu_seqlens_cpu.numel() - 1
        return_state = piece.carries if packed else index < len(pieces) - 1
        if layer.is_kda:
            out, counts, score_sum, conv_out, recurrent_out = run(
                run_kda_piece, layer, h_piece, piece.layout,
                initial_states(conv if piece.continues else None, sequences, packed),
                initial_states(recurrent if piece.continues else None, sequences, packed),
                return_state, options, use_reentrant=False)
            conv, recurrent = conv_out, recurrent_out
        else:
            begin = piece.first_start if packed else 0
            prefix = [(i, max(begin - s, 0)) for i, (s, e) in enumerate(spans) if e > begin] if piece.continues else []
            out, counts, score_sum, latent_out, k_shared_out = run(
                _run_mla_piece, layer, h_piece, piece.layout, [latents[i][:, a:] for i, a in prefix],
                [k_shared[i][:, a:] for i, a in prefix], True, options, use_reentrant=False)
            latents.append(latent_out)
            k_shared.append(k_shared_out)
            spans.append((piece.start, piece.end))
        outputs.append(out)
        if counts is not None:
            terms = RouterTerms(counts, score_sum, B * (piece.end - piece.start), layer.mlp.top_k)
            router = terms if router is None else router + terms
    return torch.cat(outputs, dim=1), router
