"""benchmarks/compile_ab.py (torch.compile against the hand-written kernels) runs here: it skips without CUDA, and
its CPU smoke mode goes through every op and variant, torch.compile included (a check of the script, not figures)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compile_ab.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=SCRIPT.parents[1], capture_output=True,
                          text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the script measures on this GPU instead of skipping")
def test_without_cuda_it_skips_with_a_message(tmp_path):
    out = tmp_path / "ab.json"
    finished = run("--out", str(out))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "skipped: no CUDA device" in finished.stdout
    assert "no CUDA device" in json.loads(out.read_text())["skipped"]


@pytest.mark.slow
def test_smoke_run_checks_every_variant_against_the_reference(tmp_path):
    out = tmp_path / "ab.json"
    finished = run("--smoke", "--modes", "default", "--out", str(out))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads(out.read_text())
    variants = {(row["op"], row["label"]): row for row in result["results"]}
    assert set(variants) == {
        ("swiglu", "reference"), ("swiglu", "compiled (default)"), ("swiglu", "kimitune"),
        ("combine", "reference"), ("combine", "compiled (default)"), ("combine", "kimitune"),
        ("casts", "reference"), ("casts", "compiled (default)"), ("casts", "compiled, concatenated (default)"),
        ("casts", "kimitune"),
    }
    has_triton = importlib.util.find_spec("triton") is not None
    for (op, label), row in variants.items():
        if label == "kimitune" and op != "casts" and not has_triton:
            assert "triton" in row["error"]  # the Triton kernels cannot run here at all
            continue
        assert row["error"] is None, row
        # bf16 outputs: the kernels and the compiled code round in float32 where the eager reference rounds its
        # intermediates, within a few units in the last place of values up to ~60
        assert max(row["max_abs_error"].values()) <= (0.5 if op == "swiglu" else 0.125), row
        assert row["forward_ms"]["median"] > 0 and row["compile_s"] >= 0
        assert ("forward_backward_ms" in row) == (op != "combine")
    assert max(variants[("casts", "kimitune")]["max_abs_error"].values()) == 0  # CastTogether is bit-exact
    expected_verdicts = {"swiglu", "combine", "casts"} if has_triton else {"casts"}
    assert {v["op"] for v in result["verdicts"]} == expected_verdicts
