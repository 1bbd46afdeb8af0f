"""One row split across the ranks of a process group (context parallelism) with the project's own state passing:
the exact maths of model/pieces.py with one piece per rank.

Rank r holds tokens [r * L, (r + 1) * L) of the row (L = T / ranks). Each decoder layer then runs on every rank's
piece; what passes between ranks is what passes between pieces:

- a KDA layer's short-conv and recurrent states, sent from rank r to r + 1 after r's piece (point to point; in
  the backward their gradients go back from r + 1 to r), so the KDA layers run one rank after another;
- an MLA layer's normalised latents and shared keys, all-gathered; each rank attends over the earlier ranks' ones
  of its sequences block by block (``kimitune.ops.prefix_attention``), all ranks at once;
- MoE and MLP work on each rank's tokens alone.

Packed rows keep their sequences apart across ranks as across pieces. The loss is each rank's tokens' summed
cross-entropy against the row's targets (shifted over the whole row, so the last token of a rank predicts the first
of the next); the caller sums it and the parameters' gradients over the ranks. The MoE's load-balancing loss is the
whole row's: its routing terms are summed over the ranks (with their gradients), and each rank returns its share of
it. Not here yet: layers in pieces within a rank, the trainer's ``context_parallel_size``. On CUDA, fla-core's context parallelism is the faster route for KDA (the layers here run
one rank after another); this module runs on any backend, gloo on the CPU included.

    context_parallel_loss(model, input_ids [B, T], labels [B, T], cu_seqlens | None, group, options)
        -> (this rank's summed loss, its share of the load-balancing loss or None), float32 scalars
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function
from torch.utils.checkpoint import checkpoint

from kimitune.model.mla import MLAPrefix
from kimitune.model.moe import RouterTerms, load_balancing_loss
from kimitune.model.options import RunOptions
from kimitune.model.pieces import Piece, initial_states, router_tensors, run_kda_piece, split_into_pieces
from kimitune.ops import BatchLayout
from kimitune.ops.loss import linear_cross_entropy


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


class _AllGather(Function):
    """x [B, L, D] of every rank -> [B, ranks * L, D]; the backward sums the gradients over the ranks and keeps this
    rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.length = group, dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.rank * ctx.length:(ctx.rank + 1) * ctx.length], None


def _kda_across_ranks(layer, h, piece: Piece, rank: int, group, options: RunOptions):
    attention = layer.self_attn
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
    out, counts, score_sum, conv_out, recurrent_out = checkpoint(
        run_kda_piece, layer, h, piece.layout, initial_states(conv, sequences, packed),
        initial_states(recurrent, sequences, packed), piece.carries, options, use_reentrant=False)
    if piece.carries:
        out = out + _SendToNext.apply(conv_out, anchor, group, rank + 1) + \
            _SendToNext.apply(recurrent_out, anchor, group, rank + 1)
    return out, counts, score_sum


def _mla_across_ranks(layer, h, piece: Piece, pieces: list[Piece], rank: int, group, options: RunOptions):
    attention = layer.self_attn
    _, kv_a = attention._query_and_latent(layer.input_layernorm(h))  # the layer computes them again for itself
    latent, k_shared = kv_a.split([attention.kv_lora_rank, attention.rope_dim], dim=-1)
    latents = _AllGather.apply(attention.kv_a_layernorm(latent), group)
    shared = _AllGather.apply(k_shared, group)
    begin = piece.first_start if piece.layout is not None else 0
    blocks = [(latents[:, max(p.start, begin):p.end], shared[:, max(p.start, begin):p.end])
              for p in pieces[:rank] if p.end > begin] if piece.continues else []
    out, router, _ = checkpoint(layer, h, piece.layout, MLAPrefix(blocks) if blocks else None, False, options,
                                use_reentrant=False)
    # Every rank's backward must reach the all-gathers (their backward is a collective), also where no later piece
    # of this rank read them
    out = out + 0 * (latents.sum() + shared.sum()).to(out.dtype)
    return (out, *router_tensors(router))


def context_parallel_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                          cu_seqlens: torch.Tensor | None, group,
                          options: RunOptions = RunOptions()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's summed loss over its tokens of the row and its share of the load-balancing loss (None when the
    coefficient, the options' or else the model config's, is 0); see the module docstring. ``input_ids`` /
    ``labels`` [B, T]: the whole row (unpacked, or packed with ``cu_seqlens`` on the host); T a multiple of the
    ranks."""
    from kimitune.model.modeling import shift_labels

    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    B, T = input_ids.shape
    if T % ranks:
        raise ValueError(f"context parallelism: the row's {T} tokens do not split evenly over {ranks} ranks (pad "
                         f"it to a multiple of {ranks})")
    device = input_ids.device
    layout = BatchLayout.of(cu_seqlens, device, T)
    pieces = split_into_pieces(layout, T, T // ranks, device)
    piece = pieces[rank]
    targets = shift_labels(labels, layout)[:, piece.start:piece.end]
    h = model.model.embed_tokens(input_ids[:, piece.start:piece.end])
    routers = []
    for layer in model.model.layers:
        if layer.is_kda:
            h, counts, score_sum = _kda_across_ranks(layer, h, piece, rank, group, options)
        else:
            h, counts, score_sum = _mla_across_ranks(layer, h, piece, pieces, rank, group, options)
        if counts is not None:  # the whole row's routing terms
            counts = counts.clone()
            dist.all_reduce(counts, group=group)
            routers.append(RouterTerms(counts, _AllReduce.apply(score_sum, group), B * T, layer.mlp.top_k))
    hidden = model.model.norm(h)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1),
                                reduction="sum", impl=options.loss_impl)
    aux = load_balancing_loss(routers, options.aux_loss_coef(model.config))
    return loss, None if aux is None else aux / ranks  # the ranks' shares add up to the row's
