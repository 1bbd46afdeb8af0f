"""The CUDA bf16 path of quantised frozen weights (linear layers, expert stacks with torch._grouped_mm, a model with
LoRA and gradient checkpointing) and its memory behaviour. Runs only where a CUDA GPU is visible."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from quant_helpers import WEIGHT_REL_ERROR, dequantized_copy, rel_error
from torch import nn

from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.adapters import LoraSettings, apply_lora, lora_modules
from kimitune.model.moe import GroupedExperts
from kimitune.quant import QuantizedWeight, QuantLinear, QuantSpec, init_quantized, quantize_model_
from kimitune.model import RunOptions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("bitsandbytes")
SPECS = [QuantSpec(8), QuantSpec(4), QuantSpec(4, "nf4", True)]
BF16_RTOL = 2e-2  # bf16 products (8 bits of mantissa) against a float32 product of the same dequantised weights


def _name(spec: QuantSpec) -> str:
    return f"{spec.bits}bit{'-' + spec.quant_type if spec.bits == 4 else ''}{'-dq' if spec.double_quant else ''}"


@pytest.mark.parametrize("spec", SPECS, ids=_name)
def test_quant_linear_bf16(spec):
    torch.manual_seed(0)
    linear = nn.Linear(2304, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    quant = QuantLinear.from_linear(linear, spec.bits, spec.quant_type, spec.double_quant)
    assert quant.weight.data.is_cuda and quant.weight.dtype == torch.bfloat16
    deq = quant.weight.dequantize(torch.float32)
    x = torch.randn(4, 256, 2304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = quant(x)
    assert y.dtype == torch.bfloat16
    assert rel_error(y, x.detach().float() @ deq.T) < BF16_RTOL
    key = 8 if spec.bits == 8 else spec.quant_type
    assert rel_error(deq, linear.weight.float()) < WEIGHT_REL_ERROR[key]
    grad = torch.randn_like(y)
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16
    assert rel_error(x.grad, grad.float() @ deq) < BF16_RTOL


@pytest.mark.parametrize("spec", SPECS, ids=_name)
def test_experts_bf16_grouped_mm_with_lora(spec):
    """48B-shaped expert rows (C=2304, I=1024) for 16 experts; grouped_mm on Hopper; LoRA gradients flow."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.experts = GroupedExperts(16, 2304, 1024).to("cuda", torch.bfloat16)
    nn.init.normal_(holder.experts.gate_up_proj, std=0.02)
    nn.init.normal_(holder.experts.down_proj, std=0.02)
    quantize_model_(holder, spec)
    reference = dequantized_copy(holder)
    settings = LoraSettings(r=16, alpha=32, target_experts=True)
    apply_lora(holder, settings)
    apply_lora(reference, settings)
    reference.load_state_dict(holder.state_dict(), strict=False)
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in holder.named_parameters():
            param.normal_(std=0.02)
            ref_params[name].copy_(param)
    counts = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(1))
    offsets = counts.cumsum(0).to(device="cuda", dtype=torch.int32)
    x = torch.randn(int(counts.sum()), 2304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = holder.experts(x, offsets), reference.experts(x_ref, offsets)
    assert rel_error(y, y_ref) < 1e-3  # the same bf16 products on the same dequantised weights
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel_error(x.grad, x_ref.grad) < 1e-2
    for name, param in holder.named_parameters():
        assert rel_error(param.grad, ref_params[name].grad) < 1e-2, name


def test_expert_stack_memory_is_transient():
    """Forward + backward through a quantised 48B-sized expert layer (256 experts): the peak above the quantised
    weights is one dequantised bf16 stack (gate_up: 2.25 GiB) plus activations, never two stacks."""
    torch.manual_seed(0)
    experts = GroupedExperts(256, 2304, 1024)
    holder = nn.Module()
    holder.experts = experts
    with torch.device("cuda"):
        for name in ("gate_up_proj", "down_proj"):
            stack = torch.empty(getattr(experts, name).shape, dtype=torch.bfloat16).normal_(std=0.02)
            delattr(experts, name)
            setattr(experts, name, QuantizedWeight.quantize(stack, 4))
            del stack
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tokens = 8192 * 8  # 8192 tokens, top-8
    offsets = torch.full((256,), tokens // 256, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(tokens, 2304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    experts(x, offsets).sum().backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    gate_up_stack = 256 * 2048 * 2304 * 2 / 2**30  # 2.25 GiB
    activations = tokens * (2304 * 3 + 2048 * 2 + 1024 * 2) * 2 / 2**30  # x, dX, gate_up out + grad, h + grad
    assert extra < gate_up_stack + activations + 0.5, (extra, gate_up_stack, activations)


@pytest.mark.parametrize("bits", [8, 4])
def test_model_bf16_lora_checkpointing(bits):
    """A 2-layer model of 48B widths (fewer experts) built quantised on the GPU, LoRA all-linear + experts,
    gradient checkpointing: loss finite, LoRA gradients equal those of the dequantised float model."""
    config = dataclasses.replace(KimiLinearConfig.preset("kimi-linear-48b-a3b"), num_hidden_layers=2, kda_layers=[1],
                                 full_attn_layers=[2], num_experts=16, num_experts_per_token=4, vocab_size=4096,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = init_quantized(config, QuantSpec(bits), device="cuda", dtype=torch.bfloat16)
    reference = dequantized_copy(model)
    settings = LoraSettings(r=16, alpha=32, target_modules="all-linear", target_experts=True)
    apply_lora(model, settings)
    apply_lora(reference, settings)
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(std=0.01)
                ref_params[name].copy_(param)
    ids = torch.randint(0, 4096, (1, 1024), device="cuda")
    loss = model(ids, labels=ids, return_logits=False, options=RunOptions(recompute_layers=model.recomputed_layers())).loss
    loss.backward()
    ref_loss = reference(ids, labels=ids, return_logits=False).loss
    ref_loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 1e-2 * ref_loss.item()
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    assert len(trainable) == 2 * len(lora_modules(model))
    for name, param in trainable:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert rel_error(param.grad, ref_params[name].grad) < 5e-2, name
