"""The optimizer: AdamW over the trainable parameters, fused on CUDA, 8-bit through bitsandbytes on request."""

from __future__ import annotations

import logging

import torch
from torch import nn

from kimitune.config import TrainConfig

log = logging.getLogger(__name__)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and undecayed vectors (norms, biases, gates)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the config asks; raises if nothing is trainable."""
    groups = parameter_groups(model, config.weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("no trainable parameters: check adapter and lora_target_modules")
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if config.optimizer == "adamw_8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("optimizer: adamw_8bit needs bitsandbytes: pip install 'kimitune[gpu]'") from err
            return bnb.optim.AdamW8bit(groups, **kwargs)
        log.warning("optimizer: adamw_8bit needs a CUDA GPU; using float32 AdamW on %s", device.type)
    # Fused on the GPU and the CPU alike: it takes the step's device-side non-finite flag (kimitune.train.step).
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
