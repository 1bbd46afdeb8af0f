"""Preference pairs with their prompt computed once: both replies continue from the prompt's states.

A pair's chosen and rejected sequences share their prompt. Packed side by side (``[P C][P R]``) the prompt is
computed twice; here a row holds the n prompts first, each without its last token, then the 2n replies, each
after that last token:

    [P_1' ... P_n' | p_1 C_1, p_1 R_1, ..., p_n C_n, p_n R_n (, padding)]     P_k = P_k' p_k

(``RunOptions.prompt_sequences`` = n: the first n packed sequences are prompts; reply sequence j, counted after
them, continues from prompt j // 2; sequences after the 2n replies, the row's padding, start from nothing). Every
decoder layer's attention runs twice: over the prompts, keeping each one's end (a KDA layer's short-conv and
recurrent states, an MLA layer's normalised latents), then over the replies, each one from its prompt's end: the
KDA ops take the states as initial states, and an MLA reply's queries attend over its prompt's latents and then its
own tokens (``MultiheadLatentAttention.attention_over``). The MoE or MLP, token by token, then runs once over the
whole row, and its routing terms count each prompt token once. Gradients from both replies flow back into the
prompt. Each reply token's loss is the one it has in ``[P C]``: the reply sequence starts with the prompt's last
token p, whose position predicts the reply's first token.

    h [1, T, C], layout (the row's packed bounds), n -> (h [1, T, C], the MoE's RouterTerms or None)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kimitune.model.kda import KDAState
from kimitune.model.mla import SequencePrefixes
from kimitune.model.options import RunOptions
from kimitune.ops import BatchLayout


@dataclass(frozen=True)
class PromptSplit:
    """A row's prompts and replies: ``split`` the first reply token's index, the two parts' own layouts, for each
    reply sequence its prompt's index (-1: none, the padding), and the same on the device as ``parent_index``
    (int64, the padding's 0) and ``has_parent`` (float [replies], 0 for the padding), copied once per row."""

    split: int
    prompts: BatchLayout
    replies: BatchLayout
    parents: list[int]
    parent_index: torch.Tensor
    has_parent: torch.Tensor

    @classmethod
    def of(cls, layout: BatchLayout | None, prompts: int, device: torch.device) -> "PromptSplit":
        if layout is None:
            raise ValueError("prompt_sequences needs a packed row (cu_seqlens): prompts first, then the replies")
        bounds = layout.host_bounds.tolist()
        replies = len(bounds) - 1 - prompts
        if prompts < 1 or replies < 2 * prompts:
            raise ValueError(f"prompt_sequences {prompts}: the row has {len(bounds) - 1} sequences, fewer than "
                             f"{prompts} prompts and their {2 * prompts} replies")
        if any(b <= a for a, b in zip(bounds[:prompts], bounds[1:prompts + 1])):
            raise ValueError("prompt_sequences: a prompt has no tokens before its last one (prompts of one token "
                             "cannot be shared)")
        split = bounds[prompts]
        head = torch.tensor(bounds[:prompts + 1], dtype=torch.int32)
        tail = torch.tensor(bounds[prompts:], dtype=torch.int32) - split
        parents = [j // 2 if j < 2 * prompts else -1 for j in range(replies)]
        host = torch.tensor([[max(p, 0), p >= 0] for p in parents], dtype=torch.int64)
        if torch.device(device).type == "cuda":  # staged, so that the copy does not wait for the GPU
            host = host.pin_memory()
        index = host.to(device, non_blocking=True)
        return cls(split, BatchLayout.of(head, device, split), BatchLayout.of(tail, device, bounds[-1] - split),
                   parents, index[:, 0], index[:, 1].float())

    def starts(self, ends: torch.Tensor) -> torch.Tensor:
        """The prompts' ends [n, ...] -> each reply's start [replies, ...] (zeros for the padding)."""
        starts = ends.index_select(0, self.parent_index)
        if min(self.parents) < 0:
            starts = starts * self.has_parent.to(starts.dtype).view(-1, *[1] * (ends.dim() - 1))
        return starts


def layer_after_prompts(layer: nn.Module, h: torch.Tensor, split: PromptSplit, options: RunOptions):
    """A decoder layer over a shared-prompt row h [1, T, C] (the module docstring) -> (out [1, T, C], RouterTerms
    of its MoE or None). The attention runs twice, prompts then replies; the feed-forward block, token by token,
    once over the whole row (twice as many rows for every expert's GEMM as either half would give it)."""
    head, tail = h[:, :split.split], h[:, split.split:]
    head, end = layer.attend(head, split.prompts, None, True, options)
    if layer.is_kda:
        state = KDAState(split.starts(end.conv), split.starts(end.recurrent))
    else:
        bounds = split.prompts.host_bounds.tolist()
        state = SequencePrefixes(end.latent, end.k_shared,
                                 [(bounds[p], bounds[p + 1]) if p >= 0 else (0, 0) for p in split.parents])
    tail, _ = layer.attend(tail, split.replies, state, False, options)
    return layer.feed_forward(torch.cat([head, tail], dim=1), options)
