"""Whole models with quantised frozen weights on the CPU: which weights, loading, memory, LoRA / CE-LoRA on top.

The tiny model (examples/models/tiny.json) with random weights is saved in float32 and loaded straight into
8-bit / 4-bit. Two checks of the logits:
- exact: the quantised model computes what a float model holding the dequantised weights computes (1e-5);
- close to the float model: its error is no larger than that of the float model with Gaussian noise of the
  same size added to every quantised matrix (same Frobenius norm per matrix), i.e. quantisation acts as noise
  of its own size and nothing systematic goes wrong. (With random weights the KDA layers magnify weight noise:
  0.65% relative weight error (int8) moves the logits by ~3%, NF4's 9% by ~40%; trained weights do far better.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from quant_helpers import dequantized_copy, rel_error
from torch import nn

from kimitune.model import RunOptions
from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.adapters import LoraSettings, apply_lora, lora_modules, merge_lora
from kimitune.quant import (
    QuantizedWeight,
    QuantLinear,
    QuantSpec,
    init_quantized,
    load_quantized,
    quantize_model_,
    quantized_weights,
    weight_bytes,
)

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
SPECS = {"8bit": QuantSpec(8), "4bit": QuantSpec(4), "4bit-double": QuantSpec(4, "nf4", True)}


@pytest.fixture(scope="module")
def tiny_config() -> KimiLinearConfig:
    return KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_config) -> tuple[Path, KimiLinearForCausalLM]:
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_config).eval()
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder, max_shard_size="200KB")  # several shards: layers cross shard files
    return folder, model


def input_ids(vocab=1000) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


def test_which_weights_are_quantised(tiny_config):
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_config)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    kept = {n: p.clone() for n, p in model.named_parameters() if "proj" not in n or "gate.weight" in n}
    names = quantize_model_(model, "8bit")
    stacks = [f"model.layers.{i}.mlp.experts.{s}" for i in range(1, 4) for s in ("gate_up_proj", "down_proj")]
    assert sorted(names) == sorted(linears + stacks)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    # Embeddings, norms, router, short conv, A_log / dt_bias: untouched Parameters.
    remaining = dict(model.named_parameters())
    for name, value in kept.items():
        assert torch.equal(remaining[name], value), name
    assert any("mlp.gate.weight" in n for n in remaining) and any("A_log" in n for n in remaining)
    assert any("conv1d" in n for n in remaining) and "model.embed_tokens.weight" in remaining
    assert set(quantized_weights(model)) == {f"{n}.weight" for n in linears} | set(stacks)


def test_skip_leaves_modules_and_their_children(tiny_config):
    model = KimiLinearForCausalLM(tiny_config)
    names = quantize_model_(model, "4bit", skip=("shared_experts", "self_attn"))
    assert names and not any("shared_experts" in n or "self_attn" in n for n in names)
    assert isinstance(model.model.layers[1].mlp.shared_experts.gate_proj, nn.Linear)
    assert not isinstance(model.model.layers[1].mlp.shared_experts.gate_proj, QuantLinear)


@pytest.mark.parametrize("kind", list(SPECS))
def test_loaded_quantised_matches_dequantised_float_and_float(saved_tiny, kind):
    folder, float_model = saved_tiny
    model = load_quantized(folder, SPECS[kind]).eval()
    quantised = quantized_weights(model)
    assert len(quantised) == len(quantize_model_(copy.deepcopy(float_model), SPECS[kind]))
    ids = input_ids()
    with torch.no_grad():
        logits = model(ids).logits
        exact = dequantized_copy(model)(ids).logits
        float_logits = float_model(ids).logits
    torch.testing.assert_close(logits, exact, rtol=1e-5, atol=1e-5)
    # Loading quantises exactly as quantize_model_ on the float model does.
    converted = copy.deepcopy(float_model)
    quantize_model_(converted, SPECS[kind])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, logits, rtol=0, atol=0)

    noisy = copy.deepcopy(float_model)
    generator = torch.Generator().manual_seed(5)
    params = dict(noisy.named_parameters())
    with torch.no_grad():
        for name, weight in quantised.items():
            original = params[name]
            error = (weight.dequantize() - original).norm()
            noise = torch.randn(original.shape, generator=generator)
            original.add_(noise * (error / noise.norm()))
        noisy_logits = noisy(ids).logits
    error, noise_error = rel_error(logits, float_logits), rel_error(noisy_logits, float_logits)
    assert error <= 1.5 * noise_error + 1e-3, (error, noise_error)
    assert error < {"8bit": 0.08}.get(kind, 0.7)
    top1 = (logits.argmax(-1) == float_logits.argmax(-1)).float().mean()
    assert top1 > {"8bit": 0.9}.get(kind, 0.3)


def test_loading_quantises_layer_by_layer(saved_tiny, monkeypatch):
    """When layer i is quantised, layers after it are still on the meta device (never materialised in float) and
    layers before it hold no float matrices: the device never holds two float layers."""
    import kimitune.quant.build as quant

    folder, _ = saved_tiny
    calls = []
    real = quant.quantize_model_

    def watching(layer, spec, *args, **kwargs):
        model_layers = watching.layers
        index = next(i for i, m in enumerate(model_layers) if m is layer)
        for later in model_layers[index + 1:]:
            assert all(p.is_meta for p in later.parameters())
        for earlier in model_layers[:index]:
            assert not any(p.ndim >= 2 and p.shape[-1] > 4 and "conv" not in n and "gate.weight" not in n
                           for n, p in earlier.named_parameters())
        calls.append(index)
        return real(layer, spec, *args, **kwargs)

    original_init = KimiLinearForCausalLM.__init__

    def remember(self, config):
        original_init(self, config)
        watching.layers = list(self.model.layers)

    monkeypatch.setattr(KimiLinearForCausalLM, "__init__", remember)
    monkeypatch.setattr(quant, "quantize_model_", watching)
    load_quantized(folder, "8bit")
    assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", list(SPECS))
def test_weight_memory(saved_tiny, kind):
    """Bytes of the loaded model = the float parameters kept + each quantised matrix at its format's size."""
    folder, float_model = saved_tiny
    model = load_quantized(folder, SPECS[kind])
    spec = SPECS[kind]
    expected = 0
    quantised = quantized_weights(model)
    float_params = dict(float_model.named_parameters())
    for name, weight in quantised.items():
        numel, rows, blocks = weight.numel(), weight.numel() // weight.shape[-1], weight.numel() // 64
        if spec.bits == 8:
            expected += numel + 4 * rows
        elif spec.double_quant:
            expected += numel // 2 + blocks + 4 * -(-blocks // 256) + 4 * (256 + 16 + 1)
        else:
            expected += numel // 2 + 4 * blocks + 4 * 16
        assert weight.numel() == float_params[name].numel()
    kept = sum(p.numel() * 4 for n, p in float_params.items() if n not in quantised)
    kept += sum(b.numel() * b.element_size() for b in float_model.buffers())
    assert weight_bytes(model) == expected + kept
    quantised_float_bytes = 4 * sum(w.numel() for w in quantised.values())
    per_weight = {8: 1.0, 4: 0.5}[spec.bits]
    assert expected / quantised_float_bytes == pytest.approx(per_weight / 4, rel=0.15)
    assert weight_bytes(model) < weight_bytes(float_model) * (0.45 if spec.bits == 8 else 0.35)


def test_init_quantized(tiny_config):
    torch.manual_seed(1)
    model = init_quantized(tiny_config, "4bit")
    again = (torch.manual_seed(1), init_quantized(tiny_config, "4bit"))[1]
    assert not any(p.is_meta for p in model.parameters())
    weights = quantized_weights(model)
    assert len(weights) == len(quantize_model_(KimiLinearForCausalLM(tiny_config), "4bit"))
    for name, weight in weights.items():
        std = weight.dequantize().std().item()
        assert 0.015 < std < 0.025, (name, std)  # normal(0, initializer_range=0.02), through NF4
    conv = model.model.layers[0].self_attn.conv1d.weight
    assert conv.abs().max() <= 1 / 2 + 1e-6 and conv.std() > 0.1  # nn.Conv1d's own init (fan-in 4: U(-1/2, 1/2))
    with torch.no_grad():
        logits = model(input_ids()).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(again(input_ids()).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_lora_model_gradients_with_checkpointing(saved_tiny, kind):
    """LoRA (all-linear + experts) on the quantised model, gradient checkpointing on: loss and every LoRA gradient
    equal those of the same LoRA on the float model holding the dequantised weights."""
    folder, _ = saved_tiny
    model = load_quantized(folder, kind)
    reference = dequantized_copy(model)
    settings = LoraSettings(r=4, alpha=8, target_modules="all-linear", target_experts=True)
    assert apply_lora(model, settings) == apply_lora(reference, settings)
    reference.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(std=0.05)
    reference_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            reference_params[name].copy_(param)
    ids = input_ids()
    loss = model(ids, labels=ids, options=RunOptions(recompute_layers=model.recomputed_layers())).loss
    loss.backward()
    ref_loss = reference(ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, _ in trainable)
    for name, param in trainable:
        torch.testing.assert_close(param.grad, reference_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ce_lora_on_quantised_base(saved_tiny):
    """CE-LoRA's approximated backward works on quantised bases: the same as on the dequantised float model."""
    from kimitune.adapters.ce_lora import CeLoraSettings, apply_ce_lora

    folder, _ = saved_tiny
    model = load_quantized(folder, "4bit")
    reference = dequantized_copy(model)
    settings = LoraSettings(r=8, alpha=16, target_modules="all-linear", target_experts=True)
    ce = CeLoraSettings(sparsity=0.5, refresh_steps=1)
    for m in (model, reference):
        torch.manual_seed(2)
        apply_ce_lora(m, settings, ce)
        for module in lora_modules(m).values():
            torch.nn.init.normal_(module.lora_B, std=0.05, generator=torch.Generator().manual_seed(4))
    ids = input_ids()
    for _ in range(2):  # the second backward reuses the kept rows chosen in the first
        for m in (model, reference):
            m.zero_grad()
            m(ids, labels=ids).loss.backward()
        grads = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_quantised_model_refuses_merge_and_full_save(saved_tiny, tmp_path):
    folder, _ = saved_tiny
    model = load_quantized(folder, "4bit")
    apply_lora(model, LoraSettings(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="merge-lora"):
        merge_lora(model)
    with pytest.raises(ValueError, match="quantised"):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="LoRA"):
        quantize_model_(model, "8bit")


def test_cuda_free_dtype_override(saved_tiny):
    """dtype= on load: unquantised tensors in that dtype, products computing in it."""
    folder, _ = saved_tiny
    model = load_quantized(folder, "8bit", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for w in quantized_weights(model).values())
    assert all(isinstance(w, QuantizedWeight) for w in quantized_weights(model).values())
    with torch.no_grad():
        assert model(input_ids()).logits.dtype == torch.bfloat16
