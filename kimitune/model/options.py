"""How a forward pass runs, apart from what the model is: ``RunOptions``, given to each call.

The same weights train with or without recomputed layers, with fla keeping its intermediates or not, with one loss
implementation or another: these are the caller's choices for a pass, so they travel with the call (the trainer
builds them once from its config) instead of being set on the built model's modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunOptions:
    """recompute_layers: decoder layers whose activations are recomputed in the backward (torch.utils.checkpoint;
    only with gradients and no cache; ``KimiLinearForCausalLM.recomputed_layers`` picks them). kda_keep_intermediates: on CUDA, fla's KDA keeps its chunk states and WY
    factors for the backward instead of recomputing them (faster, more memory; ``kimitune.ops.chunk_kda``).
    loss_impl: ``kimitune.ops.loss.linear_cross_entropy``'s implementation without logits ("fused", or "cce" to
    measure against). router_aux_loss_coef: the load-balancing loss's weight; None: the model config's.
    sequence_piece_len: the recomputed layers (and every layer of a pass without gradients) run in pieces of this
    many tokens along the sequence (model/pieces.py: the long-context step); None: whole. segment_layers: with every
    layer recomputed, runs of this many layers are recomputed together from their first input, which alone is kept
    (two levels of recomputation: one more forward of each segment, 1 / segment_layers of the layer inputs kept, plus
    one segment's while it is rebuilt); 1: every layer keeps its input. context_parallel: the process group over
    whose ranks each row is split (model/context_parallel.py; every rank gets the whole row and computes its share);
    None: no split. prompt_sequences: n > 0 for a row of preference pairs whose prompts are computed once
    (model/shared_prompts.py: the first n packed sequences are the prompts, the next 2n their replies); 0: none.
    mlp_shards: with gradients, every decoder layer's MLP or MoE runs in this many shards of each call's tokens,
    each recomputed in the backward (model/tiled_mlp.py, Axolotl's tiled_mlp); None: shards of about hidden_size
    tokens (``ceil(tokens / hidden_size)``, Axolotl's default); 1: whole."""

    recompute_layers: frozenset[int] = frozenset()
    kda_keep_intermediates: bool = False
    loss_impl: str = "fused"
    router_aux_loss_coef: float | None = None
    sequence_piece_len: int | None = None
    segment_layers: int = 1
    context_parallel: Any = None  # a torch.distributed ProcessGroup
    prompt_sequences: int = 0
    mlp_shards: int | None = 1

    def aux_loss_coef(self, config) -> float:
        """The load-balancing loss's weight: these options', else the model config's."""
        return config.router_aux_loss_coef if self.router_aux_loss_coef is None else self.router_aux_loss_coef

    def __post_init__(self) -> None:
        object.__setattr__(self, "recompute_layers", frozenset(self.recompute_layers))
        if self.mlp_shards is not None and self.mlp_shards < 1:
            raise ValueError(f"mlp_shards must be at least 1 (or None: shards of about hidden_size tokens), got "
                             f"{self.mlp_shards}")

