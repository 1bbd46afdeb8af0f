"""LoRA layers: identity when fresh, the right formula (scale, rsLoRA, dropout), gradients, merge."""

import math

import pytest
import torch
from adapter_helpers import hf_model, logits, randomize_lora
from torch import nn

from kimitune.adapters import LoraSettings, apply_lora, lora_modules, lora_state_dict, merge_lora
from kimitune.adapters.layers import ExpertsLora, LoraLinear
from kimitune.ops.grouped_mm import grouped_linear_reference

ALL = LoraSettings(r=4, alpha=8, target_linear=True, target_experts=True)


def test_fresh_adapter_is_identity_and_names_are_kept(input_ids):
    model = hf_model(projecting=True)
    before = logits(model, input_ids)
    base_names = [name for name, _ in model.named_parameters()]
    adapted = apply_lora(model, ALL)
    assert adapted == list(lora_modules(model))
    assert torch.equal(logits(model, input_ids), before)
    lora_names = set(lora_state_dict(model))
    assert [n for n, _ in model.named_parameters() if n not in lora_names] == base_names
    assert "model.layers.1.self_attn.q_proj.lora_A" in lora_names
    assert "model.layers.1.mlp.experts.adapters.gate_up_proj.lora_B" in lora_names
    shapes = {n: tuple(t.shape) for n, t in lora_state_dict(model).items()}
    assert shapes["model.layers.1.mlp.experts.adapters.gate_up_proj.lora_A"] == (4, 4, 64)  # [E, r, H]
    assert shapes["model.layers.1.mlp.experts.adapters.gate_up_proj.lora_B"] == (4, 48, 4)  # [E, 2I, r]
    assert shapes["model.layers.1.mlp.experts.adapters.down_proj.lora_A"] == (4, 4, 24)  # [E, r, I]
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ALL)


def test_linear_formula_and_rslora():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=True)
    x = torch.randn(3, 5, 16)
    expected_base = base(x)
    for use_rslora, scaling in ((False, 12 / 4), (True, 12 / math.sqrt(4))):
        layer = LoraLinear(base, r=4, alpha=12, use_rslora=use_rslora)
        nn.init.normal_(layer.lora_B)
        assert layer.scaling == pytest.approx(scaling)
        expected = expected_base + scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected)
    assert LoraSettings(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(8.0)


def test_fresh_a_follows_peft_init():
    layer = LoraLinear(nn.Linear(256, 8), r=64, alpha=1)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) over fan_in = in
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert not layer.lora_B.any()
    experts = ExpertsLora(torch.zeros(4, 8, 256), r=64, alpha=1)
    assert experts.lora_A.abs().max() <= bound and experts.lora_A.abs().max() > 0.9 * bound


def test_expert_formula_is_one_adapter_per_expert():
    torch.manual_seed(0)
    weight = torch.randn(3, 10, 6)
    adapter = ExpertsLora(weight, r=2, alpha=4)
    nn.init.normal_(adapter.lora_B)
    x = torch.randn(7, 6)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)  # expert 1 gets no rows
    adapted = weight + adapter.delta_weight()
    expected = torch.cat([x[:2] @ adapted[0].T, x[2:] @ adapted[2].T])
    torch.testing.assert_close(adapter(weight, x, offsets), expected)
    torch.testing.assert_close(adapter.lora_output(x, offsets),
                               grouped_linear_reference(x, adapter.delta_weight(), offsets))


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 16, bias=False), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 32)
    layer.eval()
    clean = layer.base_output(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), clean)
    layer.train()
    torch.manual_seed(1)
    noisy = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(noisy, layer.base_output(x) + 2.0 * (dropped @ layer.lora_A.T @ layer.lora_B.T))
    assert not torch.allclose(noisy, clean)


def test_gradients_reach_only_the_adapters(input_ids):
    model = hf_model(projecting=True)
    apply_lora(model, ALL)
    randomize_lora(model)
    model.train()
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    lora_ids = {id(p) for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)}
    for name, param in model.named_parameters():
        if id(param) in lora_ids:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_merge_equals_unmerged(input_ids):
    model = hf_model(projecting=True)
    base_names = [name for name, _ in model.named_parameters()]
    apply_lora(model, ALL)
    randomize_lora(model)
    adapted_logits = logits(model, input_ids)
    merged = merge_lora(model)
    assert merged == list(ALL.targets(hf_model(projecting=True)).names)
    assert not lora_modules(model)
    assert [name for name, _ in model.named_parameters()] == base_names
    assert type(model.model.layers[1].mlp.experts).__name__ == "ProjectingExperts"
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(model, input_ids), adapted_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(hf_model(projecting=True), input_ids), adapted_logits, atol=1e-3)


def test_bf16_base_keeps_float32_adapters():
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    layer = LoraLinear(base, r=2, alpha=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
