"""Helpers of the quantisation tests: float references built from the dequantised weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kimitune.quant import QuantizedWeight, quantized_weights

# Relative error (Frobenius) of the dequantised weight against a Gaussian float weight, with margin over what the
# formats give: int8 per row ~0.6%, NF4 blocks of 64 ~9.3%, FP4 ~ 11%.
WEIGHT_REL_ERROR = {8: 0.01, "nf4": 0.11, "fp4": 0.14}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@torch.no_grad()
def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float model computing exactly what the quantised ``model`` computes: every ``QuantizedWeight`` replaced
    by a frozen Parameter holding its dequantised values (``QuantLinear`` by an ``nn.Linear``)."""
    import copy

    from kimitune.quant import QuantLinear

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            linear.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
            linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    for name, weight in quantized_weights(model).items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        delattr(owner, child)
        setattr(owner, child, nn.Parameter(weight.dequantize(), requires_grad=False))
    return model


def saved_tensor_bytes(fn) -> tuple[object, list[int]]:
    """Runs ``fn()`` and returns its result with the numel of every tensor autograd saved for backward."""
    sizes: list[int] = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sizes


def is_quantized_weight(obj) -> bool:
    return isinstance(obj, QuantizedWeight)


def assert_same_forward_and_input_gradient(quantised, reference, x: torch.Tensor) -> torch.Tensor:
    """``quantised(x)`` and ``reference(x)`` (float maths on the dequantised weights) agree, and so do the input
    gradients they give; returns the quantised output."""
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = quantised(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    return y.detach()


ROOT = Path(__file__).resolve().parents[2]


def quickstart_like(folder: Path, **overrides) -> dict:
    """A config like examples/quickstart.yaml on 48 of its conversations (8 for evaluation), LoRA on every linear
    and the experts, ``overrides`` on top."""
    lines = (ROOT / "examples/data/quickstart_train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(lines[48:56]) + "\n")
    raw = {
        "tokenizer": str(ROOT / "examples/tokenizer"),
        "datasets": [{"path": str(folder / "train.jsonl"), "type": "chat_template"}],
        "test_datasets": [{"path": str(folder / "eval.jsonl"), "type": "chat_template"}],
        "dataset_prepared_path": str(folder / "cache"),
        "sequence_len": 256,
        "sample_packing": True,
        "micro_batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "lora_target_experts": True,
        "output_dir": str(folder / "out"),
        "seed": 3,
    }
    return raw | overrides
