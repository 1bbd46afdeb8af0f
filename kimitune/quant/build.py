"""Random-initialised models built straight into quantised form, one decoder layer at a time.

``load_pretrained(..., quantization=...)`` (``kimitune.model.checkpoint``) does the same from a checkpoint:
both build the model on the meta device and, per decoder layer, materialise it on the target device, fill it
(from the files / from the initialiser), quantise it and go on, so the device never holds more than the
quantised layers so far plus one layer in the float dtype (for Kimi-Linear-48B in bf16: 3.4 GiB of experts).
"""

from __future__ import annotations

import torch
from torch import nn

from kimitune.quant.convert import QuantSpec, quantize_model_


def _materialise_(module: nn.Module, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Meta -> ``device`` in ``dtype`` (allocated there directly), then initialised as the constructor would:
    each module's own ``reset_parameters`` (what the short conv keeps), then the model's ``_init_weights``."""
    from kimitune.model.modeling import _init_weights

    module.to(dtype=dtype)  # on meta: free; to_empty then allocates in dtype, with no float32 detour
    module.to_empty(device=device)
    for child in module.modules():
        if callable(getattr(child, "reset_parameters", None)):
            child.reset_parameters()
    module.apply(lambda m: _init_weights(m, std))


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
