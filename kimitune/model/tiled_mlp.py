"""A decoder layer's feed-forward block (dense MLP or MoE) computed in shards of tokens: Axolotl's ``tiled_mlp``.

The MLP and the MoE treat every token on its own (the router too: top-k of each token's own scores), so their
output for a batch is the concatenation of their outputs for contiguous shards of its tokens, and the routing terms
of the load-balancing loss add up over the shards (``RouterTerms``). Each shard runs under
``torch.utils.checkpoint``: the forward keeps only the shard's input, and the backward recomputes one shard at a
time, so of the block's activations (per routed copy the expert rows, the routing weights, the sort indices; the
shared expert's SwiGLU) one shard's are alive at once instead of the whole row's. The cost is one more forward of
the block. Inside a recomputed layer (``gradient_checkpointing``) or a piece of one (``sequence_piece_len``) the
shards tile what the backward rebuilds.

Shards: ``n`` a call, or (None) Axolotl's rule, ``ceil(tokens / hidden_size)``: shards of about ``hidden_size``
tokens, whatever the length of the call's rows (a whole row, or one piece of it).

    x [B, T, C] -> (block(x) [B, T, C], its RouterTerms, or None for a dense MLP)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimitune.model.moe import KimiLinearMoE, RouterTerms
from kimitune.model.pieces import router_tensors


def shard_count(tokens: int, hidden_size: int, shards: int | None) -> int:
    """How many shards ``tokens`` tokens run in: ``shards``, or ``ceil(tokens / hidden_size)`` when None; never more
    than the tokens."""
    count = -(-tokens // hidden_size) if shards is None else shards
    return max(1, min(count, tokens))


def _shard(block: nn.Module, x: torch.Tensor):
    out = block(x)
    if isinstance(block, KimiLinearMoE):
        return out.hidden, *router_tensors(out.router)
    return out, None, None


def tiled_feed_forward(block: nn.Module, x: torch.Tensor, shards: int | None) -> tuple[torch.Tensor,
                                                                                         RouterTerms | None]:
    """``block`` (KimiLinearMLP or KimiLinearMoE) over x [B, T, C] in shards of its B * T tokens, each recomputed in
    the backward (the module docstring) -> (output [B, T, C], the whole batch's RouterTerms or None)."""
    flat = x.reshape(-1, x.shape[-1])
    tokens = flat.shape[0]
    size = -(-tokens // shard_count(tokens, x.shape[-1], shards))
    outputs, router = [], None
    for start in range(0, tokens, size):
        part = flat[start:start + size]
        out, counts, score_sum = checkpoint(_shard, block, part, use_reentrant=False)
        outputs.append(out)
        if counts is not None:
            terms = RouterTerms(counts, score_sum, part.shape[0], block.top_k)
            router = terms if router is None else router + terms
    return torch.cat(outputs).view(x.shape), router
