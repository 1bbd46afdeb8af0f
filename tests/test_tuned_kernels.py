"""The store of fla's tuned kernel configs (kimitune/ops/tuned_kernels.py), with stand-ins for Triton's autotuners.

That the seeded autotuners then skip their tuning is tested on a GPU (tests/ops/test_tuned_kernels_gpu.py)."""

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


class Jitted:  # triton.jit's function: its name
    def __init__(self, name):
        self.__name__ = name


class Autotuner:  # Triton's Autotuner (fla's CachedAutotuner adds kernel_name): candidates, keys, chosen configs
    def __init__(self, kernel_name, cache, fn=None, configs=None, fla=True):
        self.cache, self.fn, self.keys = cache, fn or Jitted(kernel_name), ["H"]
        self.configs = list(configs if configs is not None else cache.values())
        if fla:
            self.kernel_name = kernel_name


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
    inner = Autotuner("wrapped", {})
    plain = Autotuner("plain", {}, fla=False)
    module = types.ModuleType("fla.ops.fake")
    module.kernel, module.other, module.number = Heuristics(inner), plain, 3
    monkeypatch.setitem(sys.modules, "fla.ops.fake", module)
    monkeypatch.setitem(sys.modules, "flash_other", types.SimpleNamespace(kernel=Autotuner("not fla", {})))
    names = {tuned_kernels.kernel_name(tuner) for tuner in tuned_kernels.live_autotuners()}
    assert {"wrapped", "plain"} <= names and "not fla" not in names


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FLA_CACHE_RESULTS", raising=False)
    monkeypatch.setenv("KIMITUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuned_kernels, "_config_dir", None)
    monkeypatch.setattr(tuned_kernels, "_seeded", set())
    return tmp_path


def shipped_folder(root: Path, entries: dict) -> Path:
    folder = root / "NVIDIA_H200" / "fla-0.6.0"
    folder.mkdir(parents=True)
    (folder / "k.json").write_text(json.dumps({"kernel_name": "k", "autotune_entries": entries}))
    return folder


def test_use_tuned_configs_seeds_the_user_folder_from_the_shipped_one(clean_env, monkeypatch):
    monkeypatch.setattr(tuned_kernels, "SHIPPED", clean_env / "shipped")
    shipped_folder(clean_env / "shipped", {"a": {"autotune_key": [1], "config": {"kwargs": {}}}})
    folder = tuned_kernels.use_tuned_configs("NVIDIA H200", "0.6.0")
    assert folder == clean_env / "cache" / "tuned_kernels" / "NVIDIA_H200" / "fla-0.6.0"
    assert set(json.loads((folder / "k.json").read_text())["autotune_entries"]) == {"a"}
    # this process's own tuning is written there, beside the shipped entries
    assert tuned_kernels.save_tuned_configs([Autotuner("k", {(5,): Config({"B": 1})})]) == 1
    assert len(json.loads((folder / "k.json").read_text())["autotune_entries"]) == 2


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)])
def test_a_gpu_without_shipped_configs_starts_from_a_same_capability_gpus(clean_env, monkeypatch, capability):
    """An H100 (no folder shipped for it) starts from the H200's configs, the same architecture; a GPU of another
    capability starts from nothing. Either way its own folder records its capability, for ship_tuned.py."""
    monkeypatch.setattr(tuned_kernels, "SHIPPED", clean_env / "shipped")
    shipped_folder(clean_env / "shipped", {"a": {"autotune_key": [1], "config": {"kwargs": {}}}})
    (clean_env / "shipped" / "NVIDIA_H200" / "gpu.json").write_text('{"name": "NVIDIA H200", "capability": [9, 0]}')
    folder = tuned_kernels.use_tuned_configs("NVIDIA H100 80GB HBM3", "0.6.0", capability)
    assert folder == clean_env / "cache" / "tuned_kernels" / "NVIDIA_H100_80GB_HBM3" / "fla-0.6.0"
    seeded = (folder / "k.json").exists() and json.loads((folder / "k.json").read_text())["autotune_entries"]
    assert bool(seeded) == (capability == (9, 0))
    assert json.loads((folder.parent / "gpu.json").read_text())["capability"] == list(capability)


def test_a_gpus_own_configs_come_before_a_same_capability_gpus(clean_env, monkeypatch):
    monkeypatch.setattr(tuned_kernels, "SHIPPED", clean_env / "shipped")
    shipped_folder(clean_env / "shipped", {"a": {"autotune_key": [1], "config": {"kwargs": {"B": 1}}},
                                           "b": {"autotune_key": [2], "config": {"kwargs": {"B": 1}}}})
    (clean_env / "shipped" / "NVIDIA_H200" / "gpu.json").write_text('{"name": "NVIDIA H200", "capability": [9, 0]}')
    own = clean_env / "shipped" / "NVIDIA_H100" / "fla-0.6.0"
    own.mkdir(parents=True)
    (own / "k.json").write_text(json.dumps({"kernel_name": "k", "autotune_entries": {
        "a": {"autotune_key": [1], "config": {"kwargs": {"B": 2}}}}}))
    folder = tuned_kernels.use_tuned_configs("NVIDIA H100", "0.6.0", (9, 0))
    entries = json.loads((folder / "k.json").read_text())["autotune_entries"]
    assert entries["a"]["config"]["kwargs"] == {"B": 2} and entries["b"]["config"]["kwargs"] == {"B": 1}


def test_a_malformed_gpu_json_is_passed_over(clean_env, monkeypatch):
    monkeypatch.setattr(tuned_kernels, "SHIPPED", clean_env / "shipped")
    shipped_folder(clean_env / "shipped", {"a": {"autotune_key": [1], "config": {"kwargs": {}}}})
    (clean_env / "shipped" / "NVIDIA_H200" / "gpu.json").write_text('{"capability": 9}')
    assert tuned_kernels.shipped_folders("NVIDIA H100", "0.6.0", (9, 0)) == []


def test_the_shipped_gpus_say_their_capability():
    for folder in sorted(p for p in tuned_kernels.SHIPPED.iterdir() if p.is_dir()):
        info = json.loads((folder / "gpu.json").read_text())
        assert len(info["capability"]) == 2 and info["name"].replace(" ", "_") == folder.name


def test_caching_off_keeps_nothing(clean_env, monkeypatch):
    monkeypatch.setenv("FLA_CACHE_RESULTS", "0")
    assert tuned_kernels.use_tuned_configs("NVIDIA H200", "0.6.0") is None
    assert tuned_kernels.save_tuned_configs([Autotuner("k", {(5,): Config({"B": 1})})]) == 0
    assert tuned_kernels.seed_autotuners([Autotuner("k", {})]) == 0


@pytest.mark.parametrize("fla", [True, False], ids=["fla's autotuner", "triton.autotune"])
def test_a_new_process_is_seeded_with_the_candidates_that_were_chosen(clean_env, fla):
    """Saved by one process, the chosen configs fill the next one's autotuners: the candidate objects themselves,
    for the exact keys; a config that is not a candidate (another fla version) and keys already tuned stay out."""
    folder = clean_env / "configs"
    small, large = Config({"BT": 16}, num_warps=2), Config({"BT": 64}, num_warps=8)
    first = Autotuner("kernel", {(32, "torch.bfloat16"): large, (4, "torch.float32"): small}, fla=fla)
    assert tuned_kernels.save_tuned_configs([first], folder) == 2
    fresh = [Config({"BT": 16}, num_warps=2), Config({"BT": 64}, num_warps=8)]  # the next process's objects
    already = Config({"BT": 64}, num_warps=8)
    second = Autotuner("kernel", {(4, "torch.float32"): already}, configs=fresh, fla=fla)
    assert tuned_kernels.seed_autotuners([second], folder) == 1
    assert second.cache[(32, "torch.bfloat16")] is fresh[1] and second.cache[(4, "torch.float32")] is already
    assert tuned_kernels.seed_autotuners([second], folder) == 0  # each autotuner once
    other = Autotuner("kernel", {}, configs=[Config({"BT": 32})], fla=fla)
    assert tuned_kernels.seed_autotuners([other], folder) == 0 and other.cache == {}


def test_a_choice_is_kept_as_soon_as_it_is_tuned(clean_env):
    """Once seeded, an autotuner writes each new key's choice right after the launch that tuned it: a first run
    stopped before its first step is over (minutes of tuning on a new machine) leaves what it tuned."""
    folder = clean_env / "configs"
    chosen = Config({"BT": 64}, num_warps=8)
    tuner = Autotuner("kernel", {}, configs=[Config({"BT": 16}), chosen])
    launches = []

    def run(*args, **kwargs):  # Triton's Autotuner.run: tunes the key it has not seen, then launches
        key = (kwargs["H"],)
        if key not in tuner.cache:
            tuner.cache[key] = chosen
        launches.append(key)
        return "launched"

    tuner.run = run
    assert tuned_kernels.seed_autotuners([tuner], folder) == 0
    assert tuner.run(grid=None, H=32) == "launched"
    entries = json.loads((folder / "kernel.json").read_text())["autotune_entries"]
    assert [e["autotune_key"] for e in entries.values()] == [[32]]
    mtime = (folder / "kernel.json").stat().st_mtime_ns
    tuner.run(grid=None, H=32)  # nothing tuned: nothing written
    assert (folder / "kernel.json").stat().st_mtime_ns == mtime and launches == [(32,), (32,)]
    tuner.run(grid=None, H=64)
    assert len(json.loads((folder / "kernel.json").read_text())["autotune_entries"]) == 2
    wrapped = tuner.run
    tuned_kernels.keep_as_tuned(tuner, folder)
    assert tuner.run is wrapped  # wrapped once


def test_shipped_configs_parse():
    """Every shipped file is fla's format, with entries keyed by the hash of their own key."""
    files = sorted(tuned_kernels.SHIPPED.glob("*/fla-*/*.json"))
    for file in files:
        data = json.loads(file.read_text())
        assert data["kernel_name"] == file.stem
        for digest, entry in data["autotune_entries"].items():
            assert digest == fla_key_hash(entry["autotune_key"]), file
            assert {"kwargs", "num_warps", "num_stages", "num_ctas"} <= set(entry["config"]), file
