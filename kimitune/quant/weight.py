"""``QuantizedWeight``: one frozen weight [out, in] or expert stack [E, out, in], held quantised.

It is an ``nn.Module`` of buffers only (nothing in it can train) that stands where the float weight stood:
``QuantLinear.weight`` for a linear layer, ``GroupedExperts.gate_up_proj`` / ``.down_proj`` for experts. It
exposes what the rest of the code reads from a frozen weight (``shape``, ``ndim``, ``device``, ``dtype`` =
the dtype it dequantises to) and ``dequantize()``; the products that use it are in ``matmul.py``.

Every float tensor of the format (scales, absmax, code tables) is stored as an int32 view of its float32 bits:
``model.to(torch.bfloat16)`` or ``.half()`` cast every floating buffer, which would round the scales and the NF4
code; integer buffers only move between devices.
"""

from __future__ import annotations

import torch
from torch import nn

from kimitune.quant import formats

FORMATS = ("int8", "fp8", "nf4", "fp4")


def _bits_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().contiguous().view(torch.int32)


class QuantizedWeight(nn.Module):
    """A frozen weight of ``shape`` in ``format`` ('int8', 'fp8', 'nf4' or 'fp4'); dequantises to ``dtype``.

    Buffers: int8: ``data`` int8 [*shape], ``scale`` [*shape[:-1]] (float32 bits). fp8: ``data`` [*shape] (the
    float8_e4m3fn bits as uint8: a cast of the model must not touch them), ``scale`` as int8's. 4-bit: ``data`` uint8
    [numel / 2], ``absmax``, ``code`` and with double quantisation ``absmax2``, ``code2``, ``offset``
    (``formats.py`` has their shapes).
    """

    def __init__(self, shape: torch.Size, format: str, dtype: torch.dtype, tensors: dict[str, torch.Tensor]):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"quantised weight format must be one of {FORMATS}, got {format!r}")
        self.shape = torch.Size(shape)
        self.format = format
        self.dtype = dtype
        self.float_buffers = tuple(name for name, tensor in tensors.items() if tensor.is_floating_point())
        for name, tensor in tensors.items():
            self.register_buffer(name, _bits_of(tensor) if name in self.float_buffers else tensor)

    @classmethod
    @torch.no_grad()
    def quantize(
        cls, weight: torch.Tensor, bits: int, quant_type: str = "nf4", double_quant: bool = False,
        dtype: torch.dtype | None = None, float8: bool = False,
    ) -> QuantizedWeight:
        """Quantises ``weight`` [out, in] or [E, out, in] on its device; ``dtype`` (default: the weight's) is the
        dtype ``dequantize`` returns. 8 bits: int8, or float8 e4m3 with ``float8``."""
        dtype = dtype or weight.dtype
        if bits == 8 and float8:
            data, scale = formats.quantize_fp8(weight)
            return cls(weight.shape, "fp8", dtype, {"data": data.view(torch.uint8), "scale": scale})
        if bits == 8:
            data, scale = formats.quantize_int8(weight)
            return cls(weight.shape, "int8", dtype, {"data": data, "scale": scale})
        if bits == 4:
            return cls(weight.shape, quant_type, dtype, formats.quantize_4bit(weight, quant_type, double_quant))
        raise ValueError(f"quantisation bits must be 8 or 4, got {bits!r}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def bits(self) -> int:
        return 8 if self.format in ("int8", "fp8") else 4

    @property
    def double_quant(self) -> bool:
        return "absmax2" in self._buffers

    def numel(self) -> int:
        """Entries of the float weight it stands for."""
        return self.shape.numel()

    def nbytes(self) -> int:
        """Bytes it holds on its device (data + every scale and table)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def grouped_linear(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [N, in] sorted by expert -> [N, out] through this expert stack [E, out, in]: the model's experts call this
        for a weight that is not a tensor (``kimitune.model.moe.GroupedExperts``)."""
        from kimitune.quant.matmul import frozen_grouped_linear  # matmul imports this module

        return frozen_grouped_linear(x, self, offsets)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [*shape] in ``dtype`` (default ``self.dtype``): a new tensor, never kept."""
        dtype = dtype or self.dtype
        if self.format == "int8":
            return formats.dequantize_int8(self.data, self.scale.view(torch.float32), dtype)  # scale: float bits
        if self.format == "fp8":
            return formats.dequantize_fp8(self.data.view(torch.float8_e4m3fn), self.scale.view(torch.float32), dtype)
        tensors = {n: b.view(torch.float32) if n in self.float_buffers else b for n, b in self._buffers.items()}
        return formats.dequantize_4bit(tensors, self.shape, self.format, dtype)

    def extra_repr(self) -> str:
        double = ", double_quant" if self.double_quant else ""
        return f"{list(self.shape)}, {self.format}{double}, dequantizes to {str(self.dtype).removeprefix('torch.')}"
