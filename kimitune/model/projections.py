"""Linears that read the same input, computed together: ``project_shared_input(x, *outputs)``.

A KDA layer feeds its normed input x to six linears (q, k, v, beta, the forget gate's f_a, the output gate's g_a),
an MLA layer to two, a SwiGLU MLP to two. Plain linears run one by one. Linears listed together in a tuple write
into one buffer (``(q_proj, k_proj, v_proj)`` gives the short conv's [..., 3 * H * K] input).

The adapter hook. A module standing where a linear stood may offer ``low_rank_terms(x) -> LowRankTerms | None``:
its frozen weight and its low-rank factors for this input, or None when it cannot join (then it runs by itself).
When every linear of a call offers terms with one rank and scale, the call runs as one node each way
(``kimitune.ops.shared_input_lora``): one down-projection GEMM for all, one accumulated input gradient. LoRA's
``LoraLinear`` (kimitune.adapters.layers) implements the hook; the model knows nothing else of adapters.

Shapes: x [..., in]; each output [..., sum of its linears' out_features].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kimitune.ops.shared_input_lora import shared_input_lora

Output = nn.Module | tuple[nn.Module, ...]


@dataclass(frozen=True)
class LowRankTerms:
    """``y = x weight^T + scaling * (x lora_a^T) lora_b^T``: weight [out, in] (frozen, x's dtype and device),
    lora_a [r, in] and lora_b [out, r] in x's dtype."""

    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


def _terms(module: nn.Module, x: torch.Tensor) -> LowRankTerms | None:
    offer = getattr(module, "low_rank_terms", None)
    return None if offer is None else offer(x)


def project_shared_input(x: torch.Tensor, *outputs: Output) -> tuple[torch.Tensor, ...]:
    """x [..., in] through every linear of ``outputs`` (a module, or a tuple of modules whose outputs are concatenated
    on the last dim) -> one tensor per output, as ``tuple(m(x) or torch.cat([m(x) for m in group], -1))``."""
    groups = [output if isinstance(output, tuple) else (output,) for output in outputs]
    modules = [m for group in groups for m in group]
    terms = []
    for module in modules:
        offered = _terms(module, x)
        if offered is None or (terms and (offered.lora_a.shape[0], offered.scaling)
                               != (terms[0].lora_a.shape[0], terms[0].scaling)):
            terms = None
            break
        terms.append(offered)
    if terms is None:
        return tuple(group[0](x) if len(group) == 1 else torch.cat([m(x) for m in group], dim=-1) for group in groups)
    ys = shared_input_lora(x.reshape(-1, x.shape[-1]), terms[0].scaling, [len(group) for group in groups],
                           [t.weight for t in terms], [t.lora_a for t in terms], [t.lora_b for t in terms])
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)
