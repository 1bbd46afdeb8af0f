"""The YAML schema: typos are caught with a suggestion, Axolotl's Kimi example is accepted."""

from pathlib import Path

import pytest

from kimitune.cli import parse_overrides
from kimitune.config import ConfigError, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def minimal(**extra):
    return {"init_from_config": "examples/models/tiny.json", "tokenizer": "examples/tokenizer", **extra}


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key `learning_rat`; did you mean `learning_rate`\?"):
        parse_config(minimal(learning_rat=1e-4))


def test_unknown_dataset_key_names_the_entry():
    with pytest.raises(ConfigError, match=r"datasets\[1\]: unknown key `feild_messages`.*`field_messages`"):
        parse_config(minimal(datasets=[{"path": "a.jsonl"}, {"path": "b.jsonl", "feild_messages": "m"}]))


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="lr_scheduler"):
        parse_config(minimal(lr_scheduler="cosine_with_restarts_and_more"))


def test_exactly_one_model_source():
    with pytest.raises(ConfigError, match="exactly one of base_model"):
        parse_config({"tokenizer": "x"})
    with pytest.raises(ConfigError, match="exactly one of base_model"):
        parse_config(minimal(base_model="some/model"))


def test_axolotl_kimi_example_is_accepted_with_a_warning_per_inert_key():
    config, warnings = load_config(EXAMPLES / "kimi-48b-lora.yaml")
    assert config.adapter == "lora" and config.lora_r == 16 and config.lora_alpha == 32
    assert config.lora_target_modules == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    assert config.sample_packing and config.sequence_len == 2048
    assert config.datasets[0].path == "fozziethebeat/alpaca_messages_2k_test"
    warned = {w.split("`")[1] for w in warnings}
    assert warned == {"flash_attention", "loss_watchdog_threshold", "loss_watchdog_patience"}
    # Keys that are set to null or false are not worth a warning.
    assert "strict" not in warned and "deepspeed" not in warned


def test_overrides_are_typed_and_applied(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("init_from_config: m.json\ntokenizer: t\nlearning_rate: 0.001\n")
    overrides = parse_overrides(["--learning-rate", "1e-4", "--sample-packing", "--max_steps=7", "--seed", "3"])
    config, _ = load_config(path, overrides)
    assert config.learning_rate == 1e-4 and config.sample_packing is True
    assert config.max_steps == 7 and config.seed == 3


def test_override_without_dashes_is_an_error():
    with pytest.raises(ConfigError, match="overrides look like --key value"):
        parse_overrides(["learning_rate", "1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_plugin_is_an_error():
    with pytest.raises(ConfigError, match="unknown plugin `my.Plugin`"):
        parse_config(minimal(plugins=["my.Plugin"]))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_config_error():
    from kimitune.train.setup import pick_device

    config, _ = parse_config(minimal(device="cuda"))
    with pytest.raises(ConfigError, match="device: .*no CUDA GPU is visible"):
        pick_device(config)


def test_recomputed_layer_count_needs_checkpointing():
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers only applies with gradient_checkpointing"):
        parse_config(minimal(gradient_checkpointing_layers=2))
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers"):
        parse_config(minimal(gradient_checkpointing=True, gradient_checkpointing_layers=0))
    config, _ = parse_config(minimal(gradient_checkpointing=True, gradient_checkpointing_layers=2))
    assert config.gradient_checkpointing_layers == 2


def test_precision_keys_work_or_warn():
    import torch

    from kimitune.train.setup import apply_tf32

    _, warnings = parse_config(minimal(fp16=True, torch_compile=True))
    assert any("`fp16: true` has no effect" in w for w in warnings)
    assert any("`torch_compile` has no effect in kimitune: kimitune compiles nothing" in w for w in warnings)
    assert not parse_config(minimal(fp16=False))[1]
    before = torch.get_float32_matmul_precision()
    try:
        apply_tf32(parse_config(minimal(tf32=True))[0])
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        apply_tf32(parse_config(minimal(tf32=False))[0])
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        apply_tf32(parse_config(minimal())[0])  # unset: left as it is
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = True


def test_the_long_context_example_parses():
    import yaml

    from kimitune.config import parse_config

    root = Path(__file__).resolve().parents[2]
    config, _ = parse_config(yaml.safe_load((root / "examples/kimi-48b-lora-long.yaml").read_text()))
    assert config.sequence_len == 262144 and config.sequence_piece_len == 16384 and config.gradient_checkpointing


def test_gradient_checkpointing_offload_is_axolotls_offloaded_checkpointing():
    from kimitune.config import parse_config

    base = {"init_from_config": "unused", "datasets": [{"path": "d.jsonl", "type": "chat_template"}]}
    config, _ = parse_config(base | {"gradient_checkpointing": "offload"})
    assert config.gradient_checkpointing is True and config.activation_offloading is True
    config, _ = parse_config(base | {"activation_offloading": True})
    assert config.activation_offloading and not config.gradient_checkpointing
    with pytest.raises(Exception, match="activation_offloading: false says not to"):
        parse_config(base | {"gradient_checkpointing": "offload", "activation_offloading": False})


def test_axolotls_tiled_mlp_keys_shard_the_feed_forward_blocks():
    from kimitune.config import ConfigError, parse_config

    base = {"init_from_config": "unused", "datasets": [{"path": "d.jsonl", "type": "chat_template"}]}
    config, warnings = parse_config(base | {"tiled_mlp": True, "tiled_mlp_num_shards": 4,
                                            "tiled_mlp_use_original_mlp": True})
    assert config.tiled_mlp and config.tiled_mlp_num_shards == 4
    assert any("tiled_mlp_use_original_mlp" in warning for warning in warnings)
    with pytest.raises(ConfigError, match="tiled_mlp_num_shards only applies with tiled_mlp: true"):
        parse_config(base | {"tiled_mlp_num_shards": 4})
