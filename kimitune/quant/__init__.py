"""Quantised frozen weights (``load_in_8bit`` / ``load_in_fp8`` / ``load_in_4bit``, QLoRA): int8 or float8 e4m3 per
row, or NF4/FP4 per block.

    weight.py    QuantizedWeight: a frozen [out, in] or [E, out, in] weight held quantised (buffers only)
    formats.py   the int8 and 4-bit (bitsandbytes) formats: quantise / dequantise plain tensors
    matmul.py    frozen_linear / frozen_grouped_linear: THE frozen products, float or quantised; the quantised
                 ones dequantise in forward and again in backward (nothing of the weight is saved)
    layers.py    QuantLinear (an nn.Linear with a QuantizedWeight)
    convert.py   QuantSpec, quantize_model_ (which weights, in place), weight_bytes
    build.py     init_quantized / load_quantized: random or checkpoint weights, quantised layer by layer

Loading a checkpoint straight into quantised form: ``load_quantized(dir, "8bit" | "4bit" | QuantSpec(...), dtype,
device)``.
"""

from kimitune.quant.build import init_quantized, load_quantized
from kimitune.quant.convert import (
    ALWAYS_SKIP,
    QuantSpec,
    is_quantized,
    quantize_model_,
    quantized_weights,
    weight_bytes,
)
from kimitune.quant.layers import QuantLinear
from kimitune.quant.matmul import dequantized, frozen_grouped_linear, frozen_linear
from kimitune.quant.weight import QuantizedWeight

__all__ = [
    "ALWAYS_SKIP",
    "QuantLinear",
    "QuantSpec",
    "QuantizedWeight",
    "dequantized",
    "frozen_grouped_linear",
    "frozen_linear",
    "init_quantized",
    "load_quantized",
    "is_quantized",
    "quantize_model_",
    "quantized_weights",
    "weight_bytes",
]
