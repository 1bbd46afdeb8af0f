"""On a CUDA GPU with fla-core: fla's tuning (its own autotuner class and plain triton.autotune), saved by kimitune
in one process, seeds a new process on an empty Triton cache (as on a new machine), which then tunes nothing.

Run on the device: python -m pytest -q tests/ops/test_tuned_kernels_gpu.py -m gpu
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and fla-core)"),
]

ROOT = Path(__file__).resolve().parents[2]

STEP = """
import torch, kimitune
from kimitune.ops import tuned_kernels
from kimitune.ops.norm import swiglu  # kimitune's op: fla's plain triton.autotune kernel
gate, up = torch.randn(2, 4096, 96, device="cuda", dtype=torch.bfloat16).unbind(0)  # a width nothing ships
swiglu(gate, up)
from fla.modules.norm.l2norm import l2norm_fwd  # fla's CachedAutotuner
tuned_kernels.seed_after_import()
l2norm_fwd(torch.randn(4096, 96, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
print("saved", tuned_kernels.save_tuned_configs())
"""


def run_step(cache: Path, triton_cache: Path) -> str:
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "one_config" not in p]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLA_", "TRITON_", "KIMITUNE_"))}
    env |= {"KIMITUNE_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(triton_cache), "TRITON_PRINT_AUTOTUNING": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *python_path])}
    done = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_new_process_on_an_empty_triton_cache_tunes_nothing(tmp_path):
    first = run_step(tmp_path / "kimitune", tmp_path / "triton-1")
    tuned = first.count("Triton autotuning for function")
    assert tuned > 0, first
    assert int(first.split("saved ")[-1]) > 0
    second = run_step(tmp_path / "kimitune", tmp_path / "triton-2")
    assert second.count("Triton autotuning for function") == 0, second
    assert "saved 0" in second


def test_kimitunes_key_hash_is_flas():
    from fla.ops.utils.cache import AutotuneKey

    from kimitune.ops.tuned_kernels import key_hash

    for key in [(32, 32, 128, 64, "torch.bfloat16"), (1, True, None, "torch.float32")]:
        assert key_hash(list(key)) == AutotuneKey.key_hash(key)


def test_shipped_configs_match_this_gpus_candidates():
    """A shipped config that is not among the kernel's candidates would launch an untested config."""
    import importlib

    from kimitune.ops import tuned_kernels

    folder = tuned_kernels.folder_for(torch.cuda.get_device_name(), importlib.metadata.version("fla-core"),
                                      tuned_kernels.SHIPPED)
    if not folder.is_dir():
        pytest.skip(f"no configs shipped for {folder}")
    import fla.modules.activations  # noqa: F401  (imports the kernels)
    import fla.modules.norm.fused_norm_gate  # noqa: F401
    import fla.modules.norm.layernorm  # noqa: F401
    import fla.ops.kda  # noqa: F401

    tuners = {tuned_kernels.kernel_name(t): t for t in tuned_kernels.live_autotuners()}
    for file in folder.glob("*.json"):
        data = json.loads(file.read_text())
        if file.stem not in tuners:
            continue
        candidates = [tuned_kernels.serialize_config(c) for c in tuners[file.stem].configs]
        for entry in data["autotune_entries"].values():
            assert entry["config"] in candidates, (file.name, entry)
