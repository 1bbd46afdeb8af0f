"""The store of fla's tuned kernel configs (kimitune/ops/tuned_kernels.py), with stand-ins for fla's autotuners.

That fla reads these files back and skips its tuning is tested on a GPU (tests/test_tuned_kernels_gpu.py)."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest

from kimitune.ops import tuned_kernels


class Config:  # the attributes of triton.Config that are written
    def __init__(self, kwargs, num_warps=4, num_stages=2, pre_hook=None):
        self.kwargs, self.num_warps, self.num_stages, self.num_ctas, self.maxnreg = kwargs, num_warps, num_stages, 1, None
        self.pre_hook = pre_hook


class Autotuner:  # fla's CachedAutotuner: a kernel name and the tuned results of this process
    def __init__(self, kernel_name, cache, fn=None):
        self.kernel_name, self.cache, self.fn = kernel_name, cache, fn


class Heuristics:  # triton.heuristics wraps the autotuner
    def __init__(self, fn):
        self.fn = fn


def fla_key_hash(key):  # fla 0.6's AutotuneKey.key_hash, written out
    return hashlib.md5(json.dumps(key, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


def test_gpu_names_follow_fla():
    assert tuned_kernels.gpu_folder_name("NVIDIA H200") == "NVIDIA_H200"
    assert tuned_kernels.gpu_folder_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuned_kernels.gpu_folder_name("--") == "unknown_gpu"


def test_saved_entries_are_what_fla_looks_up(tmp_path):
    key = (32, 32, 128, 64, "torch.bfloat16", True)
    tuner = Autotuner("chunk_kda_fwd_kernel", {key: Config({"BK": 64}, num_warps=8, num_stages=3)})
    assert tuned_kernels.save_tuned_configs([tuner], tmp_path) == 1
    data = json.loads((tmp_path / "chunk_kda_fwd_kernel.json").read_text())
    assert data["kernel_name"] == "chunk_kda_fwd_kernel"
    entry = data["autotune_entries"][fla_key_hash(list(key))]
    assert entry == {"autotune_key": list(key), "config": {"kwargs": {"BK": 64}, "num_warps": 8, "num_stages": 3,
                                                           "num_ctas": 1, "maxnreg": None}}


def test_a_saved_key_is_kept_and_new_keys_are_added(tmp_path):
    first = Autotuner("k", {(1,): Config({"B": 16})})
    assert tuned_kernels.save_tuned_configs([first], tmp_path) == 1
    mtime = (tmp_path / "k.json").stat().st_mtime_ns
    assert tuned_kernels.save_tuned_configs([first], tmp_path) == 0  # nothing new: the file is not rewritten
    assert (tmp_path / "k.json").stat().st_mtime_ns == mtime
    other = Autotuner("k", {(1,): Config({"B": 32}), (2,): Config({"B": 64})})
    assert tuned_kernels.save_tuned_configs([other], tmp_path) == 1
    entries = json.loads((tmp_path / "k.json").read_text())["autotune_entries"]
    assert {e["config"]["kwargs"]["B"] for e in entries.values()} == {16, 64}  # the first tuning of (1,) stays


def test_configs_that_cannot_be_written_are_left_out(tmp_path):
    tuner = Autotuner("k", {(1,): Config({"B": 16}, pre_hook=print), (object(),): Config({"B": 8}),
                            (3,): Config({"B": 4})})
    assert tuned_kernels.save_tuned_configs([tuner], tmp_path) == 1


def test_a_malformed_file_is_reported_and_replaced(tmp_path, caplog):
    (tmp_path / "k.json").write_text("{not json")
    assert tuned_kernels.save_tuned_configs([Autotuner("k", {(1,): Config({"B": 16})})], tmp_path) == 1
    assert "malformed kernel config file" in caplog.text
    assert len(json.loads((tmp_path / "k.json").read_text())["autotune_entries"]) == 1


def test_fla_modules_autotuners_are_found_under_heuristics(monkeypatch):
    inner = Autotuner("wrapped", {}, fn=types.SimpleNamespace())
    plain = Autotuner("plain", {})
    module = types.ModuleType("fla.ops.fake")
    module.kernel, module.other, module.number = Heuristics(inner), plain, 3
    monkeypatch.setitem(sys.modules, "fla.ops.fake", module)
    monkeypatch.setitem(sys.modules, "flash_other", types.SimpleNamespace(kernel=Autotuner("not fla", {})))
    names = {tuner.kernel_name for tuner in tuned_kernels.live_autotuners()}
    assert {"wrapped", "plain"} <= names and "not fla" not in names


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("FLA_CONFIG_DIR", "FLA_CACHE_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KIMITUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuned_kernels, "_config_dir", None)
    return tmp_path


def shipped_folder(root: Path, entries: dict) -> Path:
    folder = root / "NVIDIA_H200" / "fla-0.6.0"
    folder.mkdir(parents=True)
    (folder / "k.json").write_text(json.dumps({"kernel_name": "k", "autotune_entries": entries}))
    return folder


def test_use_tuned_configs_points_fla_at_the_seeded_user_folder(clean_env, monkeypatch):
    monkeypatch.setenv("FLA_CACHE_MODE", "strict")
    monkeypatch.setattr(tuned_kernels, "SHIPPED", clean_env / "shipped")
    shipped_folder(clean_env / "shipped", {"a": {"autotune_key": [1], "config": {"kwargs": {}}}})
    folder = tuned_kernels.use_tuned_configs("NVIDIA H200", "0.6.0")
    assert folder == clean_env / "cache" / "tuned_kernels" / "NVIDIA_H200" / "fla-0.6.0"
    assert tuned_kernels.os.environ["FLA_CONFIG_DIR"] == str(folder)
    assert set(json.loads((folder / "k.json").read_text())["autotune_entries"]) == {"a"}
    # this process's own tuning is written there, beside the shipped entries
    assert tuned_kernels.save_tuned_configs([Autotuner("k", {(5,): Config({"B": 1})})]) == 1
    assert len(json.loads((folder / "k.json").read_text())["autotune_entries"]) == 2


@pytest.mark.parametrize("env", [{"FLA_CACHE_MODE": "disabled"}, {}, {"FLA_CACHE_MODE": "strict",
                                                                     "FLA_CONFIG_DIR": "/theirs"}])
def test_the_users_choice_is_kept(clean_env, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tuned_kernels.use_tuned_configs("NVIDIA H200", "0.6.0") is None
    assert tuned_kernels.os.environ.get("FLA_CONFIG_DIR") == env.get("FLA_CONFIG_DIR")
    assert tuned_kernels.save_tuned_configs([Autotuner("k", {(5,): Config({"B": 1})})]) == 0


def test_shipped_configs_parse():
    """Every shipped file is fla's format, with entries keyed by the hash of their own key."""
    files = sorted(tuned_kernels.SHIPPED.glob("*/fla-*/*.json"))
    for file in files:
        data = json.loads(file.read_text())
        assert data["kernel_name"] == file.stem
        for digest, entry in data["autotune_entries"].items():
            assert digest == fla_key_hash(entry["autotune_key"]), file
            assert {"kwargs", "num_warps", "num_stages", "num_ctas"} <= set(entry["config"]), file
