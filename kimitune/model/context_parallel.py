"""One row split across the ranks of a process group (context parallelism): the exact maths of model/pieces.py with
one piece per rank.

Every rank is given the whole row and computes its share: rank r holds tokens [r * L, (r + 1) * L) of the row
(L = T / ranks). Each decoder layer then runs on every rank's piece; what passes between ranks is what passes
between pieces:

- a KDA layer's short-conv and recurrent states, by one of two routes:
  - fla-core's context parallelism (``RowShare.kda_context``, fla's ``FLACPContext``) where it applies: CUDA
    tensors, one row per share (packed, or an unpacked batch of one row), at least W - 1 tokens per rank (W the short
    conv's width), the references not forced, ``fla.ops.cp`` importable. The layer runs once on the rank's tokens
    and fla's kernels exchange what crosses the ranks (the conv's last W - 1 inputs; each rank's recurrence
    summarised as an affine map of its incoming state, all-gathered and chained), so the ranks' KDA layers run at
    the same time. With one rank it runs too (its all-gathers are of one rank, and the first rank is the last, so
    nothing is carried), which lets a single GPU test the route;
  - otherwise the project's own state passing: the states sent from rank r to r + 1 after r's piece (point to point;
    in the backward their gradients go back from r + 1 to r), so the KDA layers run one rank after another. This
    route runs on any backend (gloo on the CPU included) and for unpacked batches of several rows;
- an MLA layer's normalised latents and shared keys, all-gathered, and its causal work balanced: the row's queries
  in 2N blocks (``AttentionRoutes``), rank r computes the attention of blocks r and 2N - 1 - r (each over its own
  keys and every earlier block's of its sequences, block by block: ``kimitune.ops.prefix_attention``), so every
  rank attends over as many keys as the others; the queries travel to the rank that computes them and the outputs
  back (point to point, gradients the other way), all ranks at once. A row whose ranks' shares have an odd length
  keeps each rank's queries on it (the last rank attends over the most); the trainer pads rows to a multiple of 2N tokens;
- MoE and MLP work on each rank's tokens alone.

Packed rows keep their sequences apart across ranks as across pieces. The loss is each rank's tokens' summed
cross-entropy against the row's targets (shifted over the whole row, so the last token of a rank predicts the first
of the next); the caller sums it and the parameters' gradients over the ranks (FSDP2 over the same ranks does, in
its gradient reduction). The MoE's load-balancing loss is the whole row's: its routing terms are summed over the
ranks (with their gradients), and each rank returns its share of it.

Every layer runs as a module call (``layer(...)``, checkpointed where it recomputes), so FSDP2's hooks gather and
free its weights as in any forward; an MLA layer gathers its latents and moves its queries from inside its own
forward (``SharedAttention``). Per-sequence sums (preference tuning's log-probabilities) are each rank's share summed
over the group, gradients included (``sum_over_ranks``). Not here yet: layers in pieces within a rank. Apart from
fla's route for KDA, this module runs on any backend, gloo on the CPU included.

    model(input_ids [B, T], labels [B, T], cu_seqlens | None, loss_reduction="sum" | "none",
          options=RunOptions(context_parallel=group))
        -> this rank's share: the loss of its tokens, its share of the load-balancing loss
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import Function

from kimitune.model.mla import SharedAttention
from kimitune.model.moe import RouterTerms
from kimitune.model.options import RunOptions
from kimitune.model.pieces import Piece, checkpointed, initial_states, router_tensors, run_kda_piece, split_into_pieces
from kimitune.ops import BatchLayout, context_parallel_context, reference_forced
from kimitune.ops.kda import fla


class _ReceiveFromPrevious(Function):
    """A tensor of ``shape`` and ``dtype`` from the previous rank; in the backward its gradient goes back there.
    ``anchor``: a zero-size tensor that needs a gradient, so that the received tensor does too."""

    @staticmethod
    def forward(ctx, anchor, shape, dtype, group, source):
        ctx.group, ctx.source = group, source
        received = torch.empty(shape, dtype=dtype, device=anchor.device)
        dist.recv(received, group=group, group_src=source)
        return received

    @staticmethod
    def backward(ctx, grad):
        dist.send(grad.contiguous(), group=ctx.group, group_dst=ctx.source)
        return None, None, None, None, None


class _SendToNext(Function):
    """Sends ``tensor`` to the next rank and returns a zero scalar to add to the rank's output, so that the backward
    always reaches it (``anchor`` needs a gradient whatever ``tensor`` does: the next rank always sends one back),
    receives the tensor's gradient from that rank and passes it on."""

    @staticmethod
    def forward(ctx, tensor, anchor, group, destination):
        ctx.group, ctx.destination, ctx.shape, ctx.dtype = group, destination, tensor.shape, tensor.dtype
        dist.send(tensor.contiguous(), group=group, group_dst=destination)
        return tensor.new_zeros(())

    @staticmethod
    def backward(ctx, zero):
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=zero.device)
        dist.recv(grad, group=ctx.group, group_src=ctx.destination)
        return grad, None, None, None


class _AllReduce(Function):
    """The sum over the ranks, for a value every rank then uses: the backward sums the gradients over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _exchange(group, sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]]) -> None:
    """Point to point within ``group``: each (tensor, rank) of ``sends`` sent there, each (buffer, rank) of
    ``receives`` filled from there, all at once. Two messages between one pair of ranks match in the order given, so
    both sides list them in one order (the blocks', ascending)."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), group=group, group_peer=peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buffer, group=group, group_peer=peer) for buffer, peer in receives]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


@dataclass(frozen=True)
class AttentionRoutes:
    """Where an MLA layer's query blocks live and which rank computes each one's attention.

    ``blocks``: the row's query blocks in order (``Piece``: tokens, layout, continuation); ``owner[c]``: the rank
    holding block c's tokens; ``worker[c]``: the rank that computes its attention. Balanced (``balanced``, 2N blocks
    of a row that N ranks share, each rank's share two blocks): worker c for c < N, else 2N - 1 - c, so rank r
    computes blocks r and 2N - 1 - r, which attend over 2N keys' worth of blocks together (c + 1/2 blocks each),
    the same on every rank. Otherwise each rank computes its own share."""

    blocks: list[Piece]
    owner: list[int]
    worker: list[int]

    @classmethod
    def balanced(cls, layout: BatchLayout | None, total: int, ranks: int, device: torch.device) -> "AttentionRoutes":
        blocks = split_into_pieces(layout, total, total // (2 * ranks), device)
        return cls(blocks, [c // 2 for c in range(2 * ranks)],
                   [c if c < ranks else 2 * ranks - 1 - c for c in range(2 * ranks)])

    @classmethod
    def local(cls, pieces: list[Piece]) -> "AttentionRoutes":
        return cls(pieces, list(range(len(pieces))), list(range(len(pieces))))

    def owned(self, rank: int) -> list[int]:
        return [c for c, r in enumerate(self.owner) if r == rank]

    def worked(self, rank: int) -> list[int]:
        return [c for c, r in enumerate(self.worker) if r == rank]

    def shapes(self, like: torch.Tensor):
        """Block c's shape among tensors shaped as ``like`` [B, H, L_c, D]: c -> (B, H, L_c, D)."""
        head, width = tuple(like.shape[:2]), like.shape[-1]  # shapes only: no tensor is kept alive
        return lambda c: (*head, self.blocks[c].end - self.blocks[c].start, width)


def _move_blocks(group, rank: int, blocks: dict[int, torch.Tensor], source: list[int], destination: list[int],
                 shape_of) -> dict[int, torch.Tensor]:
    """Blocks c go from rank ``source[c]`` to rank ``destination[c]``: ``blocks`` are this rank's (source), the
    result the ones it receives (destination), kept in place where both are this rank. ``shape_of(c)``: block c's
    shape."""
    like = next(iter(blocks.values()))
    arriving = [c for c, d in enumerate(destination) if d == rank]
    received = {c: blocks[c] if source[c] == rank else like.new_empty(shape_of(c)) for c in arriving}
    _exchange(group, [(blocks[c], destination[c]) for c in sorted(blocks) if destination[c] != rank],
              [(received[c], source[c]) for c in arriving if source[c] != rank])
    return received


class _GatherAndRoute(Function):
    """(this rank's latents and shared keys kv [B, L, R + r], its query blocks [B, H, L_c, D] in order) -> (every
    rank's kv [B, ranks * L, R + r], the query blocks this rank computes, in order). The backward sends the query
    blocks' gradients back to their owners and sums kv's gradients over the ranks, keeping this rank's slice: one
    node, so every rank runs its collectives in one order."""

    @staticmethod
    def forward(ctx, kv, group, routes: AttentionRoutes, *own_queries):
        rank = dist.get_rank(group)
        ctx.group, ctx.routes, ctx.rank, ctx.length = group, routes, rank, kv.shape[1]
        parts = [torch.empty_like(kv) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, kv.contiguous(), group=group)
        ctx.shape_of, ctx.dtype = routes.shapes(own_queries[0]), own_queries[0].dtype
        moved = _move_blocks(group, rank, dict(zip(routes.owned(rank), own_queries)), routes.owner, routes.worker,
                             ctx.shape_of)
        return (torch.cat(parts, dim=1), *(moved[c] for c in routes.worked(rank)))

    @staticmethod
    def backward(ctx, grad_kv, *grad_queries):
        routes, rank = ctx.routes, ctx.rank
        worked = routes.worked(rank)
        grads = {c: g if g is not None else grad_kv.new_zeros(ctx.shape_of(c), dtype=ctx.dtype)
                 for c, g in zip(worked, grad_queries)}
        back = _move_blocks(ctx.group, rank, grads, routes.worker, routes.owner, ctx.shape_of)
        grad_kv = grad_kv.contiguous()
        dist.all_reduce(grad_kv, group=ctx.group)
        own = grad_kv[:, rank * ctx.length:(rank + 1) * ctx.length]
        return (own, None, None, *(back[c] for c in routes.owned(rank)))


class _RouteOutputs(Function):
    """The attention outputs of the blocks this rank computed [B, H, L_c, v], in order -> those of the blocks it
    owns, in order (each back to its owner); the backward sends the gradients the other way."""

    @staticmethod
    def forward(ctx, group, routes: AttentionRoutes, *outputs):
        rank = dist.get_rank(group)
        ctx.group, ctx.routes, ctx.rank = group, routes, rank
        ctx.shape_of, ctx.dtype, ctx.device = routes.shapes(outputs[0]), outputs[0].dtype, outputs[0].device
        moved = _move_blocks(group, rank, dict(zip(routes.worked(rank), outputs)), routes.worker, routes.owner,
                             ctx.shape_of)
        return tuple(moved[c] for c in routes.owned(rank))

    @staticmethod
    def backward(ctx, *grads):
        routes, rank = ctx.routes, ctx.rank
        owned = routes.owned(rank)
        grads = {c: g if g is not None else torch.zeros(ctx.shape_of(c), dtype=ctx.dtype, device=ctx.device)
                 for c, g in zip(owned, grads)}
        back = _move_blocks(ctx.group, rank, grads, routes.owner, routes.worker, ctx.shape_of)
        return (None, None, *(back[c] for c in routes.worked(rank)))


@dataclass(frozen=True)
class RowShare:
    """A row split over ``group``'s ranks: every rank's piece, and this rank's index (``piece`` is its own).
    ``kda_context``: fla's ``FLACPContext`` for this rank's tokens when the KDA layers take fla's route (the module
    docstring), else None."""

    pieces: list[Piece]
    rank: int
    group: Any
    attention: AttentionRoutes
    kda_context: Any = None

    @property
    def piece(self) -> Piece:
        return self.pieces[self.rank]

    @property
    def ranks(self) -> int:
        return len(self.pieces)


def share_of_row(layout: BatchLayout | None, total: int, group, device: torch.device, rows: int = 1,
                 conv_kernel_size: int | None = None) -> RowShare:
    """The split of ``rows`` rows of ``total`` tokens (their ``layout``, None when unpacked; packed: one row) over
    ``group``'s ranks. Given the KDA short conv's width ``conv_kernel_size`` (None: the project's route always), the
    share carries fla's context for the KDA layers where fla's route applies (the module docstring)."""
    ranks = dist.get_world_size(group)
    if total % ranks:
        raise ValueError(f"context parallelism: the row's {total} tokens do not split evenly over {ranks} ranks (pad "
                         f"it to a multiple of {ranks})")
    pieces = split_into_pieces(layout, total, total // ranks, device)
    kda_context = None
    # fla's CP kernels take one row (as packed bounds), have no PyTorch path, and pass the conv's last W - 1 inputs
    # from each rank's own tokens
    if (conv_kernel_size is not None and torch.device(device).type == "cuda" and rows == 1 and not reference_forced()
            and total // ranks >= conv_kernel_size - 1 and fla.context_parallel_available()):
        kda_context = context_parallel_context(layout, total, group, conv_kernel_size, device)
    # MLA's causal work balanced where every rank's share halves evenly (the trainer's rows do: row_multiple)
    balanced = ranks > 1 and total % (2 * ranks) == 0
    attention = AttentionRoutes.balanced(layout, total, ranks, device) if balanced else AttentionRoutes.local(pieces)
    return RowShare(pieces, dist.get_rank(group), group, attention, kda_context)


def row_multiple(context_parallel_size: int) -> int:
    """What a row's length is padded to a multiple of under ``context_parallel_size`` ranks: 2N, so that every rank's
    share halves into MLA's balanced query blocks (1 without context parallelism)."""
    return 1 if context_parallel_size <= 1 else 2 * context_parallel_size


def _kda_across_ranks(layer, h, share: RowShare, options: RunOptions, recompute: bool):
    """A KDA layer on this rank's piece h [B, L, C] -> (out [B, L, C], its MoE's tokens per expert and score sum, or
    None, None): through fla's context parallelism when the share has its context, else by sending the states on."""
    if share.kda_context is not None:  # fla exchanges the states inside the layer's kernels, on every rank at once
        out, router, _ = checkpointed(recompute)(layer, h, share.piece.layout, None, False, options,
                                                 share.kda_context, use_reentrant=False)
        return (out, *router_tensors(router))
    attention, piece, rank, group = layer.self_attn, share.piece, share.rank, share.group
    rows = h.shape[0] if piece.layout is None else 1
    packed = piece.layout is not None
    sequences = 1 if not packed else piece.layout.cu_seqlens_cpu.numel() - 1
    conv = recurrent = None
    anchor = torch.empty(0, device=h.device, requires_grad=True)
    if piece.continues:
        width = attention.conv1d.weight.shape
        conv = _ReceiveFromPrevious.apply(anchor, (rows, width[0], width[-1]), h.dtype, group, rank - 1)
        recurrent = _ReceiveFromPrevious.apply(
            anchor, (rows, attention.num_heads, attention.head_dim, attention.head_dim), torch.float32, group, rank - 1)
    out, counts, score_sum, conv_out, recurrent_out = checkpointed(recompute)(
        run_kda_piece, layer, h, piece.layout, initial_states(conv, sequences, packed),
        initial_states(recurrent, sequences, packed), piece.carries, options, use_reentrant=False)
    if piece.carries:
        out = out + _SendToNext.apply(conv_out, anchor, group, rank + 1) + \
            _SendToNext.apply(recurrent_out, anchor, group, rank + 1)
    return out, counts, score_sum


def _mla_across_ranks(layer, h, share: RowShare, options: RunOptions, recompute: bool):
    """An MLA layer on this rank's piece h [B, L, C]: its latents gathered, the attention of the query blocks that
    ``share.attention`` gives this rank computed here (over their own keys and their sequences' earlier blocks'), the
    outputs back on their owners."""
    routes, group = share.attention, share.group

    def attend(mla, q, latent, k_shared):
        rank, rank_dim = share.rank, latent.shape[-1]
        owned = routes.owned(rank)
        lengths = [routes.blocks[c].end - routes.blocks[c].start for c in owned]
        gathered, *queries = _GatherAndRoute.apply(torch.cat([latent, k_shared.to(latent.dtype)], dim=-1), group,
                                                   routes, *q.split(lengths, dim=2))
        latents, shared = gathered.split([rank_dim, gathered.shape[-1] - rank_dim], dim=-1)
        outputs = []
        for c, query in zip(routes.worked(rank), queries):
            block = routes.blocks[c]
            begin = block.first_start if block.layout is not None else 0
            earlier = [(latents[:, max(p.start, begin):p.end], shared[:, max(p.start, begin):p.end])
                       for p in routes.blocks[:c] if p.end > begin] if block.continues else []
            outputs.append(mla.attention_over(query, latents[:, block.start:block.end],
                                              shared[:, block.start:block.end], earlier, block.layout))
        out = torch.cat(_RouteOutputs.apply(group, routes, *outputs), dim=2)
        return out, 0 * gathered.sum()

    out, router, _ = checkpointed(recompute)(layer, h, share.piece.layout, SharedAttention(attend), False, options,
                                             use_reentrant=False)
    return (out, *router_tensors(router))


def layer_across_ranks(layer, h: torch.Tensor, share: RowShare, options: RunOptions,
                       recompute: bool) -> tuple[torch.Tensor, RouterTerms | None]:
    """A decoder layer on this rank's piece h [B, L, C] of the row -> (its output, its MoE's routing terms over this
    rank's tokens, or None for a dense layer); ``recompute``: the layer recomputes in the backward."""
    run = _kda_across_ranks if layer.is_kda else _mla_across_ranks
    out, counts, score_sum = run(layer, h, share, options, recompute)
    if counts is None:
        return out, None
    return out, RouterTerms(counts, score_sum, h.shape[0] * h.shape[1], layer.mlp.top_k)


def whole_row_routers(routers: list[RouterTerms], share: RowShare) -> list[RouterTerms]:
    """Each MoE layer's routing terms summed over the ranks (the score sums with their gradients): the whole row's,
    on every rank."""
    whole = []
    for router in routers:
        counts = router.tokens_per_expert.clone()
        dist.all_reduce(counts, group=share.group)
        whole.append(RouterTerms(counts, _AllReduce.apply(router.score_sum, share.group),
                                 router.num_tokens * share.ranks, router.top_k))
    return whole


def context_ranks(options: RunOptions | None) -> int:
    """How many ranks split each row under ``options`` (1 without context parallelism)."""
    group = None if options is None else options.context_parallel
    return 1 if group is None else dist.get_world_size(group)


def own_span(total: int, options: RunOptions) -> slice:
    """This rank's tokens of a row of ``total`` under ``options.context_parallel`` (all of them without it)."""
    ranks = context_ranks(options)
    if ranks == 1:
        return slice(0, total)
    length, rank = total // ranks, dist.get_rank(options.context_parallel)
    return slice(rank * length, (rank + 1) * length)


def sum_over_ranks(x: torch.Tensor, options: RunOptions | None) -> torch.Tensor:
    """``x`` summed over the ranks that split the row, the gradients summed back (``x`` itself without them): each
    rank's partial per-sequence sums made whole on every rank."""
    return x if context_ranks(options) == 1 else _AllReduce.apply(x, options.context_parallel)
