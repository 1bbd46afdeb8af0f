"""Release-layout checkpoints: names on disk, round trips, sharding, dtype/device, and every kind of bad folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kimitune import KimiLinearForCausalLM
from kimitune.model.checkpoint import CheckpointError, _parse_size, checkpoint_layout
from kimitune.model.configuration import ModelConfigError
from kimitune.model.safetensors_io import SafetensorsError


def file_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture()
def saved(micro_model, tmp_path):
    micro_model.save_pretrained(tmp_path)
    return tmp_path


def test_written_names_are_the_release_layout(saved, micro_model):
    tensors = file_tensors(saved)
    config = micro_model.config
    # Dense layer 0 under mlp., MoE layers under block_sparse_moe. with one tensor per expert.
    assert {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= tensors.keys()
    assert not any(name.startswith("model.layers.0.block_sparse_moe") for name in tensors)
    assert not any(".mlp." in name for name in tensors if name.startswith("model.layers.1."))
    state = micro_model.state_dict()
    inner = config.moe_intermediate_size
    for e in range(config.num_experts):
        gate_up = state["model.layers.1.mlp.experts.gate_up_proj"][e]
        torch.testing.assert_close(tensors[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"], gate_up[:inner])
        torch.testing.assert_close(tensors[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"], gate_up[inner:])
        torch.testing.assert_close(tensors[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"],
                                   state["model.layers.1.mlp.experts.down_proj"][e])
    width = config.kda_num_heads * config.kda_head_dim
    conv = state["model.layers.0.self_attn.conv1d.weight"]
    for i, p in enumerate("qkv"):
        rows = conv[i * width:(i + 1) * width]
        torch.testing.assert_close(tensors[f"model.layers.0.self_attn.{p}_conv1d.weight"], rows)
    for name in ("A_log", "dt_bias", "f_a_proj.weight", "f_b_proj.weight"):
        torch.testing.assert_close(tensors[f"model.layers.0.self_attn.{name}"],
                                   state[f"model.layers.0.self_attn.forget_gate.{name}"])
    assert "model.layers.1.block_sparse_moe.gate.e_score_correction_bias" in tensors
    assert json.loads((saved / "config.json").read_text()) == config.to_dict()


def test_round_trip_single_file_and_shards(saved, micro_model, tmp_path_factory):
    reloaded = KimiLinearForCausalLM.from_pretrained(saved)
    sharded = tmp_path_factory.mktemp("sharded")
    reloaded.save_pretrained(sharded, max_shard_size="16KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in file_tensors(sharded).values())
    again = KimiLinearForCausalLM.from_pretrained(sharded)
    for model in (reloaded, again):
        assert model.state_dict().keys() == micro_model.state_dict().keys()
        for name, tensor in micro_model.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
    # Saving again with one file removes the earlier shards and index, which would otherwise take precedence.
    again.save_pretrained(sharded)
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json", "model.safetensors"]


def test_loads_straight_into_dtype_and_device(saved, micro_model):
    model = KimiLinearForCausalLM.from_pretrained(saved, dtype=torch.bfloat16, device="cpu")
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    assert all(p.requires_grad for p in model.parameters())
    expected = micro_model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].to(torch.bfloat16)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"], expected)
    assert model.config.dtype == "bfloat16"


def test_dense_layer_under_block_sparse_moe_is_accepted(saved, micro_model):
    tensors = file_tensors(saved)
    renamed = {name.replace("layers.0.mlp.", "layers.0.block_sparse_moe."): t for name, t in tensors.items()}
    (saved / "model.safetensors").unlink()
    save_file(renamed, saved / "model.safetensors", metadata={"format": "pt"})
    model = KimiLinearForCausalLM.from_pretrained(saved)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, micro_model.model.layers[0].mlp.up_proj.weight)


def rewrite(folder, change):
    tensors = file_tensors(folder)
    change(tensors)
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    rewrite(saved, lambda t: t.pop("model.layers.2.block_sparse_moe.experts.5.w3.weight"))
    missing = r"1 missing tensor\(s\): model\.layers\.2\.block_sparse_moe\.experts\.5\.w3\.weight"
    with pytest.raises(CheckpointError, match=missing):
        KimiLinearForCausalLM.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    rewrite(saved, lambda t: t.update({"model.layers.9.self_attn.q_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.9\.self_attn\.q_proj\.weight"):
        KimiLinearForCausalLM.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    rewrite(saved, lambda t: t.update({"model.layers.3.self_attn.kv_b_proj.weight": torch.zeros(64, 15)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.self_attn\.kv_b_proj\.weight in model\.safetensors "
                                              r"is \[64, 15\], expected \[64, 16\]"):
        KimiLinearForCausalLM.from_pretrained(saved)


def test_truncated_file_is_named(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: truncated: tensor"):
        KimiLinearForCausalLM.from_pretrained(saved)


def test_corrupt_header_is_named(saved):
    file = saved / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    file.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: corrupt header"):
        KimiLinearForCausalLM.from_pretrained(saved)


def test_missing_shard_is_named(micro_model, tmp_path):
    micro_model.save_pretrained(tmp_path, max_shard_size="16KB")
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"names shard file\(s\) that are not in .*model-00002-of"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def test_wrong_model_type_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v3"}))
    with pytest.raises(ModelConfigError, match=r"config\.json: field 'model_type': expected 'kimi_linear'"):
        KimiLinearForCausalLM.from_pretrained(saved)


def test_pickle_checkpoints_are_refused(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        KimiLinearForCausalLM.from_pretrained(saved)


def test_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "absent")


def test_layout_covers_every_tensor_once(micro_model):
    layouts = checkpoint_layout(micro_model)
    assert [layout.name for layout in layouts] == list(micro_model.state_dict())
    release_names = [part.names[0] for layout in layouts for part in layout.parts]
    assert len(release_names) == len(set(release_names))


def test_shard_sizes_parse():
    assert _parse_size("5GB") == 5 * 10**9
    assert _parse_size("500MB") == 5 * 10**8
    assert _parse_size("2GiB") == 2 * 2**30
    assert _parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        _parse_size("lots")

