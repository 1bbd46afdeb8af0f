"""``kimitune merge-lora``: transformers loads the merged shards and matches kimitune with the adapter applied
(linears and experts); adapters that do not fit and bad folders are refused with the tensor or folder named."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kimitune.adapters import AdapterMismatchError, LoraSettings, apply_lora, lora_modules, save_adapter
from kimitune.cli import app
from kimitune.infer import MergeError, merge_lora_checkpoint
from kimitune.model.checkpoint import INDEX_FILE, CheckpointError

transformers = pytest.importorskip("transformers")
SETTINGS = LoraSettings(r=4, alpha=8, target_linear=True, target_experts=True)


@pytest.fixture(scope="module")
def adapted(tiny_model, tmp_path_factory):
    """(the tiny model with a random LoRA on every linear layer and both expert projections, its adapter folder)."""
    model = copy.deepcopy(tiny_model)
    apply_lora(model, SETTINGS)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in lora_modules(model).values():
            for param in (module.lora_A, module.lora_B):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(model, folder, SETTINGS)
    return model.eval(), folder


def test_transformers_loads_the_merge_and_matches_kimitune_with_the_adapter(tiny_folder, tiny_model, adapted,
                                                                             tmp_path):
    model, adapter = adapted
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge-lora", "--base", str(tiny_folder), "--adapter", str(adapter),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    base_files = sorted(p.name for p in tiny_folder.iterdir())
    assert sorted(p.name for p in out.iterdir()) == base_files  # shards, index, config and tokenizer files
    assert json.loads((out / INDEX_FILE).read_text())["weight_map"] == \
        json.loads((tiny_folder / INDEX_FILE).read_text())["weight_map"]
    merged, info = transformers.KimiLinearForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, base, got = model(ids).logits, tiny_model(ids).logits, merged.eval()(ids).logits
    # Two implementations in float32 (and W + sBA summed once in the merge): round-off relative to the logits.
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (expected - base).abs().max().item() > 0.1  # the adapter really changes the model


def rewrite_adapter(source, target, edit_tensors=None, edit_config=None):
    target.mkdir()
    tensors = load_file(str(source / "adapter_model.safetensors"))
    config = json.loads((source / "adapter_config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def _wrong_shape(tensors):
    tensors[f"{Q_PROJ}.lora_B.weight"] = torch.zeros(7, 4)


def _unknown_target(tensors):
    for part in ("lora_A", "lora_B"):
        tensors[f"base_model.model.model.layers.0.self_attn.r_proj.{part}.weight"] = tensors.pop(
            f"{Q_PROJ}.{part}.weight")


def _other_rank(config):
    config["r"] = 8


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(edit_tensors=_wrong_shape), r"q_proj\.lora_B\.weight.*shape \(7, 4\) does not fit"),
        (dict(edit_tensors=_unknown_target), r"r_proj.*the model has no module"),
        (dict(edit_config=_other_rank), r"has rank 4 but adapter_config.json says r=8"),
    ],
    ids=["shape", "target", "rank"],
)
def test_an_adapter_that_does_not_fit_is_refused_naming_the_tensor(tiny_folder, adapted, tmp_path, edit, message):
    bad = rewrite_adapter(adapted[1], tmp_path / "bad", **edit)
    with pytest.raises(AdapterMismatchError, match=message):
        merge_lora_checkpoint(tiny_folder, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_folders_are_refused(tiny_folder, adapted, tmp_path):
    adapter = adapted[1]
    with pytest.raises(FileNotFoundError, match="no base model folder"):
        merge_lora_checkpoint(tmp_path / "missing", adapter, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        merge_lora_checkpoint(tiny_folder, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(MergeError, match="is the base or the adapter folder"):
        merge_lora_checkpoint(tiny_folder, adapter, tiny_folder)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(MergeError, match="not an empty folder"):
        merge_lora_checkpoint(tiny_folder, adapter, tmp_path / "full")


def test_a_base_checkpoint_that_does_not_match_its_config_is_refused(tiny_folder, adapted, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_folder, base)
    index = json.loads((base / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.3.self_attn.kv_b_proj.weight"]
    (base / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model\.layers\.3\.self_attn\.kv_b_proj\.weight"):
        merge_lora_checkpoint(base, adapted[1], tmp_path / "out")


def test_only_model_files_are_copied_from_a_base_that_is_a_training_output(tiny_folder, adapted, tmp_path):
    _, adapter = adapted
    base = tmp_path / "trained"
    shutil.copytree(tiny_folder, base)
    run_files = ["metrics.jsonl", "loss_curve.png", "final_state.json", ".kimitune.lock", "notes.txt"]
    for name in run_files:
        (base / name).write_text("of the training run")
    (base / "checkpoint-4").mkdir()
    (base / "modeling_kimi.py").write_text("# remote code travels with the model\n")
    out = tmp_path / "merged"
    merge_lora_checkpoint(base, adapter, out)
    copied = {p.name for p in out.iterdir()}
    assert copied == {p.name for p in tiny_folder.iterdir()} | {"modeling_kimi.py"}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= copied and not copied & set(run_files)
