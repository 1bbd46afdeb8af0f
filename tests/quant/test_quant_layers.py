"""Quantised frozen weights on the CPU (real bitsandbytes): formats, products, gradients, LoRA on top.

Bounds used (W a weight, q its dequantised copy):
- int8, per entry: |q - W| <= absmax(row) / 254 (half a step of 127 levels per side);
- 4-bit, per entry: |q - W| <= c * absmax(block of 64) with c the code's largest half-gap: NF4 0.152 (between -1
  and -0.696), FP4 1/6; double quantisation rounds the absmax too (8-bit dynamic code), we allow 5% more;
- products: ``x q^T`` is computed exactly as a float layer holding ``q`` would (float32 round-off, 1e-5), so the
  error against the float layer is the weight error carried through: per output |y_q - y| <= ||x||_1 max|q - W|,
  and for Gaussian weights about the weight's relative error (int8 0.65%, NF4 9.2%, FP4 12%).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import (
    WEIGHT_REL_ERROR,
    assert_same_forward_and_input_gradient,
    dequantized_copy,
    rel_error,
    saved_tensor_bytes,
)
from torch import nn

from kimitune.adapters import LoraSettings, apply_lora
from kimitune.adapters.layers import ExpertsLora, LoraLinear
from kimitune.model.moe import GroupedExperts
from kimitune.ops.grouped_mm import grouped_linear
from kimitune.quant import (
    QuantizedWeight,
    QuantLinear,
    QuantSpec,
    frozen_grouped_linear,
    frozen_linear,
    quantize_model_,
)

bnb_functional = pytest.importorskip("bitsandbytes.functional")

FOUR_BIT = [("nf4", False), ("nf4", True), ("fp4", False)]
HALF_GAP = {"nf4": 0.152, "fp4": 1 / 6}


def gaussian(*shape, seed=0, std=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def offsets_for(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


# ----- formats -----

def test_int8_matches_bitsandbytes_vectorwise_quant():
    w = gaussian(3, 48, 128)
    q = QuantizedWeight.quantize(w, 8)
    data, stats, _ = bnb_functional.int8_vectorwise_quant(w.reshape(-1, 128))
    # Same rounding rule; a tie (x.5) may round either way, so allow one step on a handful of entries.
    diff = (q.data.reshape(-1, 128).int() - data.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    torch.testing.assert_close(q.scale.view(torch.float32).reshape(-1), stats)


def test_int8_error_bound():
    w = gaussian(64, 128)
    q = QuantizedWeight.quantize(w, 8)
    error = (q.dequantize() - w).abs()
    assert (error <= w.abs().amax(-1, keepdim=True) / 254 + 1e-9).all()
    assert rel_error(q.dequantize(), w) < WEIGHT_REL_ERROR[8]


@pytest.mark.parametrize("quant_type,double_quant", FOUR_BIT)
def test_4bit_error_bound(quant_type, double_quant):
    w = gaussian(4, 96, 128)
    q = QuantizedWeight.quantize(w, 4, quant_type, double_quant)
    error = (q.dequantize() - w).reshape(-1, 64).abs().amax(-1)
    bound = HALF_GAP[quant_type] * w.reshape(-1, 64).abs().amax(-1) * (1.05 if double_quant else 1.0001)
    assert (error <= bound).all()
    assert rel_error(q.dequantize(), w) < WEIGHT_REL_ERROR[quant_type]
    # bitsandbytes' own round trip gives the same numbers (we only store its tensors differently).
    data, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    torch.testing.assert_close(q.dequantize(), bnb_functional.dequantize_4bit(data, state), rtol=0, atol=0)


def test_bytes_per_weight():
    w = gaussian(96, 128)
    assert QuantizedWeight.quantize(w, 8).nbytes() == 96 * 128 + 4 * 96  # int8 + a float32 scale per row
    nf4 = QuantizedWeight.quantize(w, 4)
    assert nf4.nbytes() == 96 * 128 // 2 + 4 * 96 * 128 // 64 + 4 * 16  # two per byte, absmax per 64, code
    double = QuantizedWeight.quantize(w, 4, double_quant=True)
    blocks = 96 * 128 // 64
    assert double.nbytes() == 96 * 128 // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4


def test_dtype_casts_leave_scales_alone():
    """model.to(bf16) casts floating buffers; the scales and code are stored as int32 bits, so they survive."""
    w = gaussian(32, 64)
    holder = nn.Module()
    holder.w = QuantizedWeight.quantize(w, 4)
    before = holder.w.dequantize(torch.float32)
    holder.to(torch.bfloat16)
    torch.testing.assert_close(holder.w.dequantize(torch.float32), before, rtol=0, atol=0)


# ----- products and gradients -----

@pytest.mark.parametrize("bits,quant_type", [(8, "nf4"), (4, "nf4"), (4, "fp4")])
def test_quant_linear_forward_backward(bits, quant_type):
    linear = nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(gaussian(96, 128))
    quant = QuantLinear.from_linear(linear, bits, quant_type)
    assert isinstance(quant, nn.Linear) and not any(p.requires_grad for p in quant.parameters())
    reference = F.linear  # float layer holding the dequantised weight
    deq = quant.weight.dequantize()

    x = torch.randn(2, 5, 128, requires_grad=True)
    y = quant(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(x_ref, deq, linear.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    # Against the float layer: the weight's error carried through.
    key = 8 if bits == 8 else quant_type
    assert rel_error(y - linear.bias, linear(x) - linear.bias) < 1.2 * WEIGHT_REL_ERROR[key]

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_quant_linear_saves_no_weight_for_backward():
    linear = nn.Linear(256, 512, bias=False)
    quant = QuantLinear.from_linear(linear, 4)
    x = torch.randn(3, 256, requires_grad=True)
    _, sizes = saved_tensor_bytes(lambda: quant(x))
    assert all(size < 256 * 512 for size in sizes), sizes  # nothing of weight size is kept (here: nothing at all)
    _, float_sizes = saved_tensor_bytes(lambda: linear(x))
    assert max(float_sizes) == 256 * 512  # where the float layer keeps its weight


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_quantised_linear(bits):
    """LoraLinear takes over the QuantLinear's weight; gradients of x, A and B equal those of LoRA on a float
    layer that holds the dequantised weight."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    quant = QuantLinear.from_linear(linear, bits)
    lora_q = LoraLinear(quant, r=4, alpha=8)
    float_base = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        float_base.weight.copy_(quant.weight.dequantize())
        lora_q.lora_B.normal_()  # a zero B would hide the A gradient
    float_base.weight.requires_grad_(False)
    lora_f = LoraLinear(float_base, r=4, alpha=8)
    lora_f.load_state_dict({"lora_A": lora_q.lora_A, "lora_B": lora_q.lora_B}, strict=False)
    assert isinstance(lora_q.weight, QuantizedWeight)
    assert "weight.data" in dict(lora_q.named_buffers())  # the base keeps its name: <linear>.weight.*

    assert_same_forward_and_input_gradient(lora_q, lora_f, torch.randn(7, 128, requires_grad=True))
    torch.testing.assert_close(lora_q.lora_A.grad, lora_f.lora_A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora_q.lora_B.grad, lora_f.lora_B.grad, rtol=1e-5, atol=1e-6)


# ----- stacked experts -----

def quantised_experts(bits, quant_type="nf4", double_quant=False, seed=0):
    """GroupedExperts (4 experts, C=128, I=64) with Gaussian weights, and its float twin."""
    experts = GroupedExperts(4, 128, 64)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gaussian(4, 128, 128, seed=seed))
        experts.down_proj.copy_(gaussian(4, 128, 64, seed=seed + 1))
    float_experts = GroupedExperts(4, 128, 64)
    float_experts.load_state_dict(experts.state_dict())
    holder = nn.Module()
    holder.experts = experts
    quantize_model_(holder, QuantSpec(bits, quant_type, double_quant))
    return holder.experts, float_experts


@pytest.mark.parametrize("bits,quant_type,double_quant", [(8, "nf4", False), (4, "nf4", False), (4, "nf4", True),
                                                          (4, "fp4", False)])
def test_quantised_experts_forward_backward(bits, quant_type, double_quant):
    experts, float_experts = quantised_experts(bits, quant_type, double_quant)
    assert isinstance(experts.gate_up_proj, QuantizedWeight) and isinstance(experts.down_proj, QuantizedWeight)
    assert not list(experts.parameters())
    offsets = offsets_for([3, 0, 5, 4])  # an expert with no rows too
    x = torch.randn(12, 128, requires_grad=True)
    y = experts(x, offsets)

    # Reference: the same grouped maths on the dequantised stacks (autograd through float weights).
    gate_up, down = experts.gate_up_proj.dequantize(), experts.down_proj.dequantize()
    x_ref = x.detach().clone().requires_grad_(True)
    g, u = grouped_linear(x_ref, gate_up, offsets).chunk(2, dim=-1)
    y_ref = grouped_linear(F.silu(g) * u, down, offsets)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    key = 8 if bits == 8 else quant_type
    # Two products in a row: the errors add (SwiGLU in between is smooth); 2.5x the one-matrix bound.
    assert rel_error(y, float_experts(x.detach(), offsets)) < 2.5 * WEIGHT_REL_ERROR[key]

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_quantised_experts_keep_no_stack_for_backward():
    experts, float_experts = quantised_experts(4)
    offsets = offsets_for([3, 2, 5, 4])
    x = torch.randn(14, 128, requires_grad=True)
    _, sizes = saved_tensor_bytes(lambda: experts(x, offsets))
    stack = 4 * 64 * 128  # the smaller stack
    assert all(size < stack for size in sizes), sizes
    _, float_sizes = saved_tensor_bytes(lambda: float_experts(x, offsets))
    assert max(float_sizes) >= stack


@pytest.mark.parametrize("bits", [8, 4])
def test_experts_lora_on_quantised_stacks(bits):
    """apply_lora on quantised experts: ExpertsLora's base_output dequantises; gradients of x, A and B match LoRA
    on float experts holding the dequantised stacks."""
    experts, _ = quantised_experts(bits)
    holder_q = nn.Module()
    holder_q.experts = experts
    holder_f = dequantized_copy(holder_q)
    settings = LoraSettings(r=4, alpha=8, target_experts=True)
    assert apply_lora(holder_q, settings) == apply_lora(holder_f, settings) == ["experts.gate_up_proj",
                                                                                  "experts.down_proj"]
    float_params = dict(holder_f.named_parameters())
    with torch.no_grad():
        for name, param in holder_q.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1)
            float_params[name].copy_(param)
    offsets = offsets_for([4, 1, 0, 6])
    x = torch.randn(11, 128, requires_grad=True)
    x_f = x.detach().clone().requires_grad_(True)
    out_q, out_f = holder_q.experts(x, offsets), holder_f.experts(x_f, offsets)
    torch.testing.assert_close(out_q, out_f, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_q)
    out_q.backward(grad)
    out_f.backward(grad)
    torch.testing.assert_close(x.grad, x_f.grad, rtol=1e-5, atol=1e-6)
    for name, param in holder_q.named_parameters():
        assert param.requires_grad and "lora" in name
        torch.testing.assert_close(param.grad, float_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_products_take_float_weights_unchanged():
    w = gaussian(16, 32)
    x = torch.randn(3, 32)
    assert torch.equal(frozen_linear(x, w), F.linear(x, w))
    stack = gaussian(2, 16, 32)
    offsets = offsets_for([1, 2])
    assert torch.equal(frozen_grouped_linear(x, stack, offsets), grouped_linear(x, stack, offsets))


def test_expert_lora_class_unchanged():
    """The LoRA layers are the plain ones: quantisation adds no subclass of them."""
    experts, _ = quantised_experts(8)
    lora = ExpertsLora(experts.gate_up_proj, r=2, alpha=4)
    assert lora.lora_A.shape == (4, 2, 128) and lora.lora_B.shape == (4, 128, 2)
