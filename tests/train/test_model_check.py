"""A broken base model is reported before any data is tokenised, with the file and the problem named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_trainer import ROOT, raw_config, run, small_data  # noqa: F401  (small_data is a fixture)

import kimitune.data
from kimitune import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.train.model_check import check_model_folder

LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "max_steps": 1,
        "save_steps": None, "eval_steps": None}


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")).save_pretrained(folder)
    return folder


def broken_copy(good: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def drop_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")


def wider_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


CASES = [
    (lambda folder: (folder / "config.json").unlink(), r"base_model: no model config at .*broken/config\.json"),
    (lambda folder: (folder / "config.json").write_text("{not json"), r"base_model: .*config\.json: not valid JSON"),
    (drop_tensor, r"base_model: .*broken does not match its config\.json: 1 missing tensor\(s\): model\.norm\.weight"),
    (wider_config, r"base_model: .*broken: 3 tensor\(s\) with the wrong shape for its config\.json: "
                   r"model\.layers\.0\.mlp\.gate_proj\.weight in model\.safetensors is \[256, 128\], "
                   r"expected \[512, 128\]"),
    (truncate, r"base_model: .*model\.safetensors: truncated: tensor .* ends at byte"),
    (lambda folder: shutil.rmtree(folder), r"base_model: no model folder at .*broken"),
]


@pytest.mark.parametrize("damage, message", CASES, ids=["no config", "bad json", "missing tensor", "wrong shape",
                                                         "truncated", "no folder"])
def test_a_broken_base_model_fails_before_the_data_is_tokenised(good_model, tmp_path, small_data, monkeypatch,
                                                                damage, message):
    folder = broken_copy(good_model, tmp_path, damage)

    def tokenising(*args, **kwargs):
        raise AssertionError("the data was tokenised before the model was checked")

    monkeypatch.setattr(kimitune.data, "prepare_datasets", tokenising)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(raw_config(small_data, tmp_path / "out", base_model=str(folder), init_from_config=None, **LORA))


def test_a_good_folder_passes_and_gives_its_config(good_model):
    assert check_model_folder(good_model).hidden_size == 128
