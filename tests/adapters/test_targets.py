"""LoRA targeting: PEFT's name rules, all-linear equal to PEFT's set, explicit experts, clear errors."""

import pytest
from adapter_helpers import hf_model
from peft import LoraConfig, get_peft_model

from kimitune.adapters import LoraSettings, LoraTargetError, apply_lora
from kimitune.config import parse_config
from kimitune.train.settings import lora_settings

GATE_UP, DOWN = "model.layers.{}.mlp.experts.gate_up_proj", "model.layers.{}.mlp.experts.down_proj"


def targets(settings: LoraSettings, projecting: bool = True) -> list[str]:
    return list(settings.targets(hf_model(projecting=projecting)).names)


def peft_targets(target_modules) -> set[str]:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM")
    return set(get_peft_model(hf_model(), config).base_model.targeted_module_names)


def test_suffix_rule_matches_peft():
    names = ["q_proj", "layers.2.self_attn.o_proj", "f_a_proj"]
    ours = targets(LoraSettings(target_modules=names))
    assert set(ours) == peft_targets(names)
    assert "model.layers.0.self_attn.q_proj" in ours and "model.layers.1.self_attn.q_proj" in ours  # KDA and MLA
    assert [n for n in ours if n.endswith("o_proj")] == ["model.layers.2.self_attn.o_proj"]


def test_regex_matches_peft():
    regex = r"model\.layers\.[01]\.self_attn\.(q|k|v)_proj"
    ours = targets(LoraSettings(target_modules=regex))
    assert set(ours) == peft_targets(regex) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
    }


def test_all_linear_is_peft_all_linear():
    ours = targets(LoraSettings(target_modules="all-linear"), projecting=False)
    assert set(ours) == peft_targets("all-linear")
    assert targets(LoraSettings(target_linear=True), projecting=False) == ours
    assert not any(n == "lm_head" or n.endswith("mlp.gate") or ".mlp.experts" in n for n in ours)
    assert "model.layers.1.mlp.shared_experts.down_proj" in ours and "model.layers.0.mlp.down_proj" in ours


def test_experts_only_when_asked():
    assert not any("mlp.experts" in n for n in targets(LoraSettings(target_modules=["down_proj", "gate_proj"])))
    experts = [GATE_UP.format(1), DOWN.format(1), GATE_UP.format(2), DOWN.format(2)]
    assert targets(LoraSettings(target_experts=True)) == experts
    assert targets(LoraSettings(target_modules=["experts"])) == experts
    assert targets(LoraSettings(target_modules=["experts.down_proj"])) == [DOWN.format(1), DOWN.format(2)]
    assert targets(LoraSettings(target_modules=[GATE_UP.format(2)])) == [GATE_UP.format(2)]
    assert targets(LoraSettings(target_modules=r".*layers\.1\.mlp\.experts")) == experts[:2]
    with_linear = targets(LoraSettings(target_linear=True, target_experts=True))
    assert [n for n in with_linear if ".mlp.experts." in n] == experts
    assert with_linear.index(GATE_UP.format(1)) < with_linear.index("model.layers.1.mlp.shared_experts.gate_proj")


def test_from_config_reads_the_yaml_keys():
    config, _ = parse_config({
        "init_from_config": "x.json", "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "lora_target_modules": ["q_proj"], "lora_target_experts": True, "peft_use_rslora": True,
    })
    settings = lora_settings(config)
    assert settings == LoraSettings(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj",), target_experts=True,
                                    use_rslora=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (LoraSettings(target_modules=["q_proj", "qkv_proj"]), "entry 'qkv_proj' matches no nn.Linear"),
        (LoraSettings(target_modules=["gate_up_proj"]), "named 'experts.gate_up_proj'"),
        (LoraSettings(target_modules=["lm_head"]), "lm_head is never adapted"),
        (LoraSettings(target_modules=["gate"]), "entry 'gate' matches no"),  # the router is not a linear layer
        (LoraSettings(target_modules=r"layers\.\d+\.q_proj"), "must match the whole name"),
        (LoraSettings(target_modules="q_proj("), "not a valid regex"),
        (LoraSettings(), "no LoRA targets"),
    ],
)
def test_unmatched_targets_are_named(settings, message):
    with pytest.raises(LoraTargetError, match=message):
        apply_lora(hf_model(projecting=True), settings)


def test_experts_on_a_model_without_experts_hook():
    with pytest.raises(LoraTargetError, match="no stacked experts"):
        apply_lora(hf_model(projecting=False), LoraSettings(target_experts=True))


def test_bad_settings():
    with pytest.raises(ValueError, match="lora_r"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraSettings(dropout=1.0)
