"""Random-initialised models built straight into quantised form, one decoder layer at a time.

``load_quantized`` does the same from a checkpoint (``kimitune.model.checkpoint.load_pretrained``'s per-layer hook):
both build the model on the meta device and, per decoder layer, materialise it on the target device, fill it
(from the files / from the initialiser), quantise it and go on, so the device never holds more than the
quantised layers so far plus one layer in the float dtype (for Kimi-Linear-48B, one layer's experts in bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from kimitune.quant.convert import QuantSpec, quantize_model_


def _materialise_(module: nn.Module, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Meta -> ``device`` in ``dtype`` (allocated there directly), then initialised as the constructor would:
    each module's own ``reset_parameters`` (what the short conv keeps), then the model's ``init_weights``."""
    from kimitune.model.modeling import init_weights

    module.to(dtype=dtype)  # on meta: free; to_empty then allocates in dtype, with no float32 detour
    module.to_empty(device=device)
    for child in module.modules():
        if callable(getattr(child, "reset_parameters", None)):
            child.reset_parameters()
    module.apply(lambda m: init_weights(m, std))


@torch.no_grad()
def init_quantized(
    config,
    quantization: QuantSpec | str | int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = (),
):
    """A ``KimiLinearForCausalLM`` of ``config`` with random weights (kimitune's initialisation, drawn from the
    global RNG of ``device``), its frozen linears and experts quantised by ``quantization`` (``skip``: as
    ``quantize_model_``'s, relative to a decoder layer); embeddings, norms and ``lm_head`` in ``dtype``, which is
    also the compute dtype of the quantised products."""
    from kimitune.model.modeling import KimiLinearForCausalLM

    spec = QuantSpec.parse(quantization)
    device = torch.device(device)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    std = config.initializer_range
    _materialise_(model.model.embed_tokens, device, dtype, std)
    for layer in model.model.layers:
        _materialise_(layer, device, dtype, std)
        quantize_model_(layer, spec, skip=skip)
    _materialise_(model.model.norm, device, dtype, std)
    _materialise_(model.lm_head, device, dtype, std)
    return model


def load_quantized(
    path,
    quantization: QuantSpec | str | int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """A release-layout folder -> ``KimiLinearForCausalLM`` with its frozen linears and experts quantised by
    ``quantization`` ('8bit', '4bit' or a ``QuantSpec``), each decoder layer as soon as its tensors are read."""
    from kimitune.model.checkpoint import load_pretrained

    spec = QuantSpec.parse(quantization)
    return load_pretrained(path, dtype=dtype, device=device, on_layer_loaded=lambda layer: quantize_model_(layer, spec))
