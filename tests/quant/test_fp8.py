"""FP8 frozen weights (load_in_fp8, issue 24) on the CPU: the e4m3 per-row format, the products through the
dequantising reference path (what runs on every device today), LoRA on top, and a run through the trainer whose
adapter merges onto the float checkpoint. No bitsandbytes: the format is torch's float8_e4m3fn."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from quant_helpers import assert_same_forward_and_input_gradient, dequantized_copy, quickstart_like, rel_error
from rich.console import Console
from torch import nn

from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.adapters import load_adapter
from kimitune.config import ConfigError, load_config, parse_config
from kimitune.model.moe import GroupedExperts
from kimitune.ops.grouped_mm import grouped_linear
from kimitune.quant import QuantizedWeight, QuantLinear, QuantSpec, quantize_model_, quantized_weights
from kimitune.quant.formats import FP8_MAX, quantize_fp8
from kimitune.train.settings import quant_spec
from kimitune.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def gaussian(*shape, seed=0, std=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def test_each_row_is_scaled_to_e4m3s_range_and_rounded_once():
    w = gaussian(3, 64, 128)
    w[0, 5] = 0.0  # an all-zero row stays zero
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 64)
    assert scale[0, 5] == 1.0 and q[0, 5].float().abs().max() == 0
    expected = (w / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)  # torch's round-to-nearest-even cast
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert torch.allclose(q.float().abs().amax(-1)[scale != 1.0], torch.tensor(FP8_MAX))
    # per entry: half an ulp of 3 mantissa bits (2^-4 relative), or half the subnormal step (2^-10 of the scale)
    error = (q.float() * scale.unsqueeze(-1) - w).abs()
    bound = torch.maximum(w.abs() / 16, scale.unsqueeze(-1) / 1024) * (1 + 1e-6)
    assert (error <= bound).all()
    assert rel_error(q.float() * scale.unsqueeze(-1), w) < 0.03  # ~2.2% for Gaussian weights


def test_bytes_and_casts():
    w = gaussian(96, 128)
    weight = QuantizedWeight.quantize(w, 8, float8=True)
    assert weight.format == "fp8" and weight.bits == 8
    assert weight.nbytes() == 96 * 128 + 4 * 96  # one byte a weight and a float32 scale per row
    holder = nn.Module()
    holder.w = weight
    before = holder.w.dequantize(torch.float32)
    holder.to(torch.bfloat16)  # floating buffers are cast: the e4m3 bits are uint8, the scale int32 bits
    assert torch.equal(holder.w.dequantize(torch.float32), before)


def test_fp8_linear_forward_backward_is_the_dequantised_layer():
    linear = nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(gaussian(96, 128))
    quant = QuantLinear.from_linear(linear, 8, float8=True)
    deq = quant.weight.dequantize()
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = assert_same_forward_and_input_gradient(quant, lambda x: F.linear(x, deq, linear.bias.detach()), x)
    assert rel_error(y - linear.bias, linear(x.detach()) - linear.bias) < 0.03


def test_fp8_expert_stacks_forward_backward():
    torch.manual_seed(0)
    holder = nn.Module()
    holder.experts = GroupedExperts(4, 128, 64)
    with torch.no_grad():
        holder.experts.gate_up_proj.copy_(gaussian(4, 128, 128, seed=1))
        holder.experts.down_proj.copy_(gaussian(4, 128, 64, seed=2))
    float_experts = copy.deepcopy(holder.experts)
    assert quantize_model_(holder, "fp8") == ["experts.gate_up_proj", "experts.down_proj"]
    experts = holder.experts
    assert experts.gate_up_proj.format == "fp8"
    offsets = torch.tensor([3, 0, 5, 4]).cumsum(0).to(torch.int32)
    gate_up, down = experts.gate_up_proj.dequantize(), experts.down_proj.dequantize()

    def reference(x):
        g, u = grouped_linear(x, gate_up, offsets).chunk(2, dim=-1)
        return grouped_linear(F.silu(g) * u, down, offsets)

    x = torch.randn(12, 128, requires_grad=True)
    y = assert_same_forward_and_input_gradient(lambda x: experts(x, offsets), reference, x)
    assert rel_error(y, float_experts(x.detach(), offsets)) < 0.06


def test_a_quantised_model_computes_what_its_dequantised_copy_does():
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).eval()
    float_model = copy.deepcopy(model)
    names = quantize_model_(model, QuantSpec.parse("fp8"))
    assert names and all(w.format == "fp8" for w in quantized_weights(model).values())
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, exact, reference = model(ids).logits, dequantized_copy(model)(ids).logits, float_model(ids).logits
    torch.testing.assert_close(logits, exact, rtol=1e-5, atol=1e-5)
    # Against the float model: no worse than Gaussian noise of the same size on every quantised weight.
    noisy = copy.deepcopy(float_model)
    generator = torch.Generator().manual_seed(5)
    params = dict(noisy.named_parameters())
    with torch.no_grad():
        for name, weight in quantized_weights(model).items():
            noise = torch.randn(params[name].shape, generator=generator)
            params[name].add_(noise * ((weight.dequantize() - params[name]).norm() / noise.norm()))
        noise_error = rel_error(noisy(ids).logits, reference)
    error = rel_error(logits, reference)
    assert error <= 1.5 * noise_error + 1e-3 and error < 0.2, (error, noise_error)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.5  # a random model: near-ties


@pytest.mark.usefixtures("one_thread")
def test_an_fp8_lora_run_learns_and_its_adapter_merges_onto_the_float_checkpoint(tmp_path):
    base = tmp_path / "base"
    torch.manual_seed(0)
    KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).save_pretrained(base)
    raw = quickstart_like(tmp_path, base_model=str(base), load_in_fp8=True, adapter="lora", max_steps=6, eval_steps=6)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    config, _ = load_config(tmp_path / "config.yaml")
    assert quant_spec(config) == QuantSpec(8, float8=True)
    summary = Trainer(config, Console(quiet=True)).train()
    assert summary.final_eval_loss < summary.first_eval_loss - 0.5, (summary.first_eval_loss, summary.final_eval_loss)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()

    from kimitune.infer import merge_lora_checkpoint

    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    on_float = KimiLinearForCausalLM.from_pretrained(base)
    load_adapter(on_float, out)
    merge_lora_checkpoint(base, out, tmp_path / "merged")
    merged = KimiLinearForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, on_float(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"load_in_fp8": True}, "full fine-tuning"),
    ({"load_in_fp8": True, "load_in_8bit": True, "adapter": "lora"}, "load_in_8bit and load_in_fp8 are exclusive"),
])
def test_fp8_config_errors(tmp_path, overrides, message):
    raw = quickstart_like(tmp_path, init_from_config=str(ROOT / "examples/models/tiny.json"), **overrides)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_the_plan_counts_fp8_weights_as_int8s():
    from kimitune.plan import Part, predict_peak_memory

    cfg = KimiLinearConfig.from_pretrained(ROOT / "examples/models/kimi-linear-48b-a3b.json")
    raw = {"base_model": "unused", "adapter": "lora", "lora_target_linear": True, "sequence_len": 8192}
    plans = {key: predict_peak_memory(parse_config(raw | {key: True})[0], cfg) for key in ("load_in_8bit", "load_in_fp8")}
    fp8 = next(i for i in plans["load_in_fp8"].items if i.part is Part.FROZEN_FP8)
    int8 = next(i for i in plans["load_in_8bit"].items if i.part is Part.FROZEN_INT8)
    assert fp8.bytes == int8.bytes and plans["load_in_fp8"].peak_allocated == plans["load_in_8bit"].peak_allocated


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_products_on_the_gpu():
    """On CUDA frozen_linear multiplies in FP8 (torch._scaled_mm); against the dequantising path and bf16."""
    from kimitune.ops import force_reference

    linear = nn.Linear(2304, 1024, bias=False).cuda().bfloat16()
    quant = QuantLinear.from_linear(linear, 8, float8=True)
    x = torch.randn(4096, 2304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = quant(x)
    with force_reference():
        y_ref = quant(x_ref)
    assert rel_error(y, y_ref) < 0.04 and rel_error(y, linear(x.detach())) < 0.05
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel_error(x.grad, x_ref.grad) < 0.04


@pytest.mark.parametrize("leading", [(2, 40), (7,)])
def test_fp8_products_against_the_dequantising_path(leading):
    """The FP8 products (Fp8LinearFunction; torch._scaled_mm runs on the CPU too, so the maths is tested here):
    forward and input gradient within the e4m3 rounding of the activations and gradients of the dequantised
    layer's, which is exact in the weight."""
    from kimitune.quant.matmul import DequantLinearFunction, Fp8LinearFunction

    linear = nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(gaussian(96, 128))
    quant = QuantLinear.from_linear(linear, 8, float8=True)
    x = torch.randn(*leading, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = Fp8LinearFunction.apply(x.reshape(-1, 128), quant.weight, quant.bias, torch.float32).view(*leading, 96)
    y_ref = DequantLinearFunction.apply(x_ref, quant.weight, quant.bias, torch.float32)
    assert y.shape == y_ref.shape
    assert rel_error(y - quant.bias, y_ref - quant.bias) < 0.04
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel_error(x.grad, x_ref.grad) < 0.04
    # exact in the weight: with activations and gradients that e4m3 holds exactly (one value per row, scaled to
    # 448), the FP8 products equal the dequantised ones
    exact = torch.zeros(16, 128)
    exact[torch.arange(16), torch.arange(16)] = 1.0
    torch.testing.assert_close(Fp8LinearFunction.apply(exact, quant.weight, None, torch.float32),
                               DequantLinearFunction.apply(exact, quant.weight, None, torch.float32), rtol=1e-6, atol=0)


def test_lora_adds_in_place_onto_an_fp8_product(monkeypatch):
    """The LoRA layer adds its update in place onto the frozen product's output (a [B, T, out] view): with the FP8
    products chosen (forced here, as on a GPU) that runs, and its input and adapter gradients are the dequantising
    path's within the e4m3 rounding."""
    from kimitune.adapters import LoraSettings, apply_lora
    from kimitune.quant import matmul

    holder = nn.Sequential(nn.Linear(128, 96, bias=False))
    with torch.no_grad():
        holder[0].weight.copy_(gaussian(96, 128))
    quantize_model_(holder, "fp8")
    apply_lora(holder, LoraSettings(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in holder.named_parameters():
            if "lora_B" in name:
                p.copy_(gaussian(*p.shape, seed=3))
    x = torch.randn(2, 40, 128)
    grads = {}
    for fp8 in (True, False):
        monkeypatch.setattr(matmul, "fp8_products_apply", lambda x, weight, fp8=fp8: fp8)
        holder.zero_grad()
        inputs = x.clone().requires_grad_(True)
        holder(inputs).square().sum().backward()
        grads[fp8] = [inputs.grad] + [p.grad for p in holder.parameters() if p.requires_grad]
    for fp8_grad, reference in zip(grads[True], grads[False]):
        assert rel_error(fp8_grad, reference) < 0.05


def test_fp8_products_are_chosen_only_where_they_apply():
    from kimitune.quant.matmul import fp8_products_apply

    weight = QuantizedWeight.quantize(gaussian(96, 128), 8, float8=True)
    assert not fp8_products_apply(torch.zeros(2, 128), weight)  # the CPU takes the dequantising path
    assert not fp8_products_apply(torch.zeros(2, 120), QuantizedWeight.quantize(gaussian(96, 120), 8, float8=True))
    assert not fp8_products_apply(torch.zeros(2, 128), QuantizedWeight.quantize(gaussian(96, 128), 8))  # int8
