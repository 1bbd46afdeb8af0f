"""PEFT-format adapters: PEFT 0.21 loads what we save (same logits), we load what PEFT saves, bad files are refused."""

import json

import pytest
import torch
from adapter_helpers import EXPERTS, hf_model, logits, randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from kimitune.adapters import (
    AdapterMismatchError,
    LoraSettings,
    apply_lora,
    load_adapter,
    lora_modules,
    read_adapter,
    save_adapter,
)
from kimitune.adapters.peft_format import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

LINEARS = LoraSettings(r=4, alpha=8, dropout=0.05, target_modules="all-linear")
ALL = LoraSettings(r=4, alpha=8, dropout=0.05, target_linear=True, target_experts=True, use_rslora=True)


def trained(settings: LoraSettings, seed: int = 1):
    model = hf_model(projecting=True)
    apply_lora(model, settings)
    randomize_lora(model, seed)
    return model


def peft_logits(adapter_dir, input_ids) -> torch.Tensor:
    """transformers' own model, pristine (its experts compute in forward), with PEFT loading the adapter."""
    return logits(PeftModel.from_pretrained(hf_model(), str(adapter_dir)).eval(), input_ids)


@pytest.mark.parametrize(
    "settings",
    [
        LINEARS,
        ALL,
        LoraSettings(r=2, alpha=3, target_modules=["q_proj", "experts.down_proj"]),  # one projection: no nesting
        LoraSettings(r=3, alpha=6, target_modules=["experts.gate_up_proj"]),  # experts only: no target_modules
    ],
    ids=["all-linear", "linear+experts+rslora", "down_proj-only", "gate_up-only"],
)
def test_peft_loads_what_we_save(tmp_path, input_ids, settings):
    model = trained(settings)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(hf_model(), input_ids), atol=1e-3)  # the adapter matters
    save_adapter(model, tmp_path, settings, base_model="tiny")
    config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == settings.r
    torch.testing.assert_close(peft_logits(tmp_path, input_ids), ours, atol=1e-5, rtol=1e-5)


def test_expert_keys_and_layout(tmp_path):
    model = trained(ALL)
    save_adapter(model, tmp_path, ALL)
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))
    prefix = "base_model.model.model.layers.1.mlp.experts"
    gate_up = model.model.layers[1].mlp.experts.adapters["gate_up_proj"]
    a, b = tensors[f"{prefix}.base_layer.lora_A.weight"], tensors[f"{prefix}.base_layer.lora_B.weight"]
    assert a.shape == (EXPERTS * 4, 64) and b.shape == (48, 4 * EXPERTS)
    assert tensors[f"{prefix}.lora_A.weight"].shape == (EXPERTS * 4, 24)  # down_proj: outermost wrapper
    expert, rank = 2, 1
    assert torch.equal(a[expert * 4 + rank], gate_up.lora_A[expert, rank])  # A rows: expert-major
    assert torch.equal(b[:, rank * EXPERTS + expert], gate_up.lora_B[expert, :, rank])  # B columns: rank-major
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert config["lora_dropout"] == 0.0  # PEFT refuses dropout with target_parameters
    assert config["target_parameters"] == [
        "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
        "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
    ]


def test_we_load_what_peft_saves(tmp_path, input_ids):
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(hf_model(), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    expected = logits(peft_model.eval(), input_ids)
    peft_model.save_pretrained(str(tmp_path))
    model = hf_model(projecting=True)
    names = load_adapter(model, tmp_path)
    assert len(names) == len(lora_modules(model)) and "model.layers.2.mlp.experts.down_proj" in names
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preapplied", [False, True])
def test_save_load_roundtrip(tmp_path, input_ids, preapplied):
    model = trained(ALL)
    save_adapter(model, tmp_path, ALL)
    fresh = hf_model(projecting=True)
    if preapplied:  # the trainer's path: apply_lora from the config, then lora_model_dir
        apply_lora(fresh, ALL)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, input_ids), logits(model, input_ids), atol=0, rtol=0)


def test_adapter_file_gives_what_merging_adds(tmp_path):
    model = trained(ALL)
    save_adapter(model, tmp_path, ALL)
    adapter = read_adapter(tmp_path)
    experts = "model.layers.2.mlp.experts.down_proj"
    assert adapter.parameter_name(experts) == experts
    torch.testing.assert_close(adapter.delta_weight(experts),
                               model.model.layers[2].mlp.experts.adapters["down_proj"].delta_weight())
    q_proj = "model.layers.1.self_attn.q_proj"
    assert adapter.parameter_name(q_proj) == f"{q_proj}.weight"
    torch.testing.assert_close(adapter.delta_weight(q_proj), model.model.layers[1].self_attn.q_proj.delta_weight())


def edit_tensors(directory, edit):
    tensors = load_file(str(directory / ADAPTER_WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_FILE))


def edit_config(directory, **changes):
    config = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    config.update(changes)
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))


Q = "base_model.model.model.layers.1.self_attn.q_proj"


def _wrong_shape(tensors):
    tensors[f"{Q}.lora_B.weight"] = torch.zeros(40, 4)


def _missing_target(tensors):
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)


def _not_linear(tensors):
    tensors["base_model.model.model.layers.1.input_layernorm.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.1.input_layernorm.lora_B.weight"] = torch.zeros(64, 4)


def _foreign_key(tensors):
    tensors[f"{Q}.lora_magnitude_vector"] = torch.zeros(48)


def _wrong_expert_count(tensors):
    prefix = "base_model.model.model.layers.2.mlp.experts"
    tensors[f"{prefix}.lora_A.weight"] = torch.zeros(3 * 4, 24)
    tensors[f"{prefix}.lora_B.weight"] = torch.zeros(64, 4 * 3)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_wrong_shape, rf"'{Q}.lora_B.weight': shape \(40, 4\) does not fit .* needs \(48, 4\)"),
        (_missing_target, "the model has no module 'model.layers.7.self_attn.q_proj'"),
        (_not_linear, "is a KimiLinearRMSNorm, not a linear layer or experts"),
        (_foreign_key, "is not a LoRA weight"),
        (_wrong_expert_count, r"layers.2.mlp.experts.lora_A.weight': shape \(3, 4, 24\) does not fit"),
        (lambda t: t.pop(f"{Q}.lora_B.weight"), "has no lora_A/lora_B partner"),
    ],
    ids=["shape", "missing-module", "not-linear", "foreign-key", "expert-count", "half-pair"],
)
def test_bad_tensors_are_refused(tmp_path, edit, message):
    save_adapter(trained(ALL), tmp_path, ALL)
    edit_tensors(tmp_path, edit)
    model = hf_model(projecting=True)
    with pytest.raises(AdapterMismatchError, match=message):
        load_adapter(model, tmp_path)
    assert not lora_modules(model)  # nothing changed before the check failed


def test_rank_mismatches_are_refused(tmp_path):
    save_adapter(trained(ALL), tmp_path, ALL)
    edit_config(tmp_path, r=8)
    wrong_rank = r"tensor 'base_model\.model\..*\.lora_A\.weight' has rank 4 but adapter_config.json says r=8"
    with pytest.raises(AdapterMismatchError, match=wrong_rank):
        load_adapter(hf_model(projecting=True), tmp_path)

    edit_config(tmp_path, r=4)
    model = hf_model(projecting=True)
    apply_lora(model, LoraSettings(r=8, alpha=16, target_linear=True, target_experts=True, use_rslora=True))
    with pytest.raises(AdapterMismatchError, match="rank mismatch, the model's LoRA on .* has r=8 but .* r=4"):
        load_adapter(model, tmp_path)


def test_target_and_scale_mismatches_are_refused(tmp_path):
    save_adapter(trained(LINEARS), tmp_path, LINEARS)
    model = hf_model(projecting=True)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_linear=True, target_experts=True))
    with pytest.raises(AdapterMismatchError, match="the model's LoRA on 'model.layers.1.mlp.experts.gate_up_proj' "
                                                   "has no tensors"):
        load_adapter(model, tmp_path)
    model = hf_model(projecting=True)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(AdapterMismatchError, match="the model has no LoRA on 'model.layers.0.mlp.down_proj' to load"):
        load_adapter(model, tmp_path)
    model = hf_model(projecting=True)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_linear=True, use_rslora=True))
    with pytest.raises(AdapterMismatchError, match="scale mismatch"):
        load_adapter(model, tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "`use_dora: True` is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "`rank_pattern"),
        ({"peft_type": "IA3"}, "only LORA adapters"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, changes, message):
    save_adapter(trained(LINEARS), tmp_path, LINEARS)
    edit_config(tmp_path, **changes)
    with pytest.raises(AdapterMismatchError, match=message):
        load_adapter(hf_model(projecting=True), tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(AdapterMismatchError, match="no adapter_config.json"):
        read_adapter(tmp_path)
