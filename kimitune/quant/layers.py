"""``QuantLinear``: a frozen linear layer whose weight is a ``QuantizedWeight``.

It stays an ``nn.Linear`` (same ``in_features`` / ``out_features`` / ``bias``, same place in the model), so LoRA
targeting (``all-linear``, names) sees it exactly as the float layer, and ``LoraLinear`` takes over its
``weight`` and ``bias`` as it does a float layer's; the product goes through ``matmul.frozen_linear``.

The stacked experts need no layer class of their own: ``GroupedExperts.project`` computes through
``frozen_grouped_linear``, so quantising them is replacing their ``gate_up_proj`` / ``down_proj`` Parameters by
``QuantizedWeight`` modules (``convert.quantize_model_``).
"""

from __future__ import annotations

import torch
from torch import nn

from kimitune.quant.matmul import frozen_linear
from kimitune.quant.weight import QuantizedWeight


class QuantLinear(nn.Linear):
    """x [..., in] -> x W^T + b with ``weight`` a ``QuantizedWeight`` [out, in] (frozen) and ``bias`` [out] or None."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, quant_type: str = "nf4", double_quant: bool = False,
        dtype: torch.dtype | None = None, float8: bool = False,
    ) -> QuantLinear:
        """Quantises ``linear``'s weight on its device (the bias stays as it is, frozen)."""
        weight = QuantizedWeight.quantize(linear.weight.detach(), bits, quant_type, double_quant, dtype, float8)
        bias = linear.bias
        if bias is not None:
            bias.requires_grad_(False)
        return cls(weight, bias).train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)
