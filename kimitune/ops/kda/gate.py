"""KDA's forget gate: the per-channel log decay from the gate projection's raw output.

    kda_decay(f [..., H, K], A_log [H], dt_bias [H * K] | None) -> g = -exp(A_log) * softplus(f + dt_bias)   float32

``kimitune.ops.chunk_kda`` takes ``f`` with ``A_log`` and ``dt_bias`` instead of ``g``: on CUDA fla's kernels compute
the decay inside (``use_gate_in_kernel``) and recompute it in the backward, so a training step keeps only ``f`` in
its dtype, where a precomputed ``g`` keeps three float32 tensors of its size (softplus's input, ``g`` and its
chunk-local cumulative sum). The PyTorch path computes ``g`` with this function first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kda_decay(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """f [..., H, K] -> log decay [..., H, K] float32 (A_log [H], dt_bias [H * K] added to f first)."""
    heads, head_dim = f.shape[-2:]
    f = f.float()
    if dt_bias is not None:
        f = f + dt_bias.float().view(heads, head_dim)
    return -A_log.float().view(heads, 1).exp() * F.softplus(f)
