"""RMS norms with transformers' KimiLinear precision: statistics in float32 (kimitune.ops.norm computes them).

``RMSNorm`` normalises in float32, casts back to the input dtype, then scales by the weight (so a float32 weight
on bfloat16 input gives float32 out, as in transformers). ``GatedRMSNorm`` (KDA's output norm) keeps everything,
weight and sigmoid gate included, in float32 and casts once at the end. On CUDA both run as one fla-core kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from kimitune.ops.norm import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """x [..., D] -> weight * (x / sqrt(mean(x^2) + eps))."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """x, gate [..., D] -> (weight * rmsnorm(x) * sigmoid(gate)) in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
