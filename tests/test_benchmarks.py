"""The benchmark scripts run end to end in their CPU smoke modes, so the scripts behind benchmarks/RESULTS.md keep
working between GPU sessions (a smoke run checks the script, not the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE_RUNS = {
    "train_gpu": ["benchmarks/train_gpu.py", "--smoke", "--rows", "kimitune,kimitune+fp8,peer", "--seq", "128",
                  "--ckpt", "off,on", "--warmup", "1", "--steps", "1"],
    "train_48b": ["benchmarks/train_48b.py", "--smoke"],
    "train_long": ["benchmarks/train_long.py", "--smoke", "--tiled-mlp"],
    "train_long_peer": ["benchmarks/train_long.py", "--smoke", "--peer", "--steps", "1"],
    "long_data": ["benchmarks/long_data.py", "--words", "2000"],
    "train_multi_gpu": ["benchmarks/train_multi_gpu.py", "--smoke", "--gpus", "1,2", "--seq", "64", "--reshard",
                        "on,off", "--warmup", "1", "--steps", "1"],
    "decode": ["benchmarks/decode.py", "--contexts", "32,48", "--new-tokens", "3"],
    "ce_lora": ["benchmarks/ce_lora.py", "speed", "--tiny", "--seq", "128", "--warmup", "1", "--steps", "1"],
    "loss_gpu": ["benchmarks/loss_gpu.py", "--device", "cpu", "--rows", "256,300", "--warmup", "1", "--steps", "1"],
    "train_product": ["benchmarks/train_product.py", "--smoke"],
    "dpo_gpu": ["benchmarks/dpo_gpu.py", "--smoke", "--kimitune", "piece=8+tiled=2,shared"],
    "fp8_loss": ["benchmarks/fp8_loss.py", "--smoke"],
    "fp8_grouped": ["benchmarks/fp8_grouped.py", "--smoke", "--repeats", "1"],
    "prefix_attention_gpu": ["benchmarks/prefix_attention_gpu.py", "--smoke", "--blocks", "0,2", "--reps", "1",
                             "--key-layouts", "model,tokens"],
}


@pytest.mark.parametrize("name", SMOKE_RUNS)
def test_benchmark_smoke_run(name, tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, *SMOKE_RUNS[name]]
    if name in ("train_gpu", "train_multi_gpu", "decode", "ce_lora", "loss_gpu", "train_product", "dpo_gpu",
                "fp8_loss", "fp8_grouped", "prefix_attention_gpu"):
        command += ["--json", str(out)]
    if name in ("train_product", "dpo_gpu"):  # what they write (a model folder and data; TRL's output_dir) goes here
        command += ["--work", str(tmp_path / "work")]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # A launch that failed is a row, not an exit status: its workers' errors are on stderr.
    assert "failed" not in finished.stdout and "OOM" not in finished.stdout, (finished.stdout[-3000:]
                                                                              + finished.stderr[-3000:])
    if out.exists():
        rows = json.loads(out.read_text())
        rows = rows["results"] if isinstance(rows, dict) else rows
        assert rows and all("error" not in row and "failed" not in row for row in rows), rows


def test_train_long_refuses_the_peer_with_quantised_weights():
    finished = subprocess.run([sys.executable, "benchmarks/train_long.py", "--smoke", "--peer", "--bits", "8"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2 and "--peer runs bf16 weights (--bits 16)" in finished.stderr, finished.stderr


@pytest.mark.parametrize("spec, named", [("shared+bogus", "'bogus'"), ("piece=0", "'piece=0'"),
                                         ("tiled=x", "'tiled=x'")])
def test_dpo_gpu_names_a_kimitune_setting_it_does_not_know(spec, named):
    finished = subprocess.run([sys.executable, "benchmarks/dpo_gpu.py", "--smoke", "--kimitune", f"whole,{spec}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2 and f"--kimitune: {named} in {spec!r} is none of" in finished.stderr, \
        finished.stderr


def test_the_gpu_memory_cap(monkeypatch):
    """train_48b.cap_memory (train_48b.py and train_long.py): a cap of 0 or less is refused by name, a cap above the
    card's memory leaves the card as the limit (--cap-gib 80 on an H100's 79.2 GiB), a smaller one is set."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from train_48b import GiB, cap_memory

    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Card", (), {"total_memory": int(79.2 * GiB)})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction: fractions.append(fraction))
    with pytest.raises(SystemExit, match=r"--cap-gib 0: a cap must be above 0 GiB"):
        cap_memory(0)
    assert cap_memory(None) is None and fractions == []
    assert cap_memory(80) == pytest.approx(79.2, abs=1e-6) and fractions == []
    assert cap_memory(40) == 40 and fractions == [pytest.approx(40 / 79.2)]


def test_prefix_attention_gpu_names_a_key_layout_it_does_not_know():
    finished = subprocess.run([sys.executable, "benchmarks/prefix_attention_gpu.py", "--smoke", "--key-layouts",
                               "model,rows"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2 and "--key-layouts: rows unknown; known: model, tokens" in finished.stderr
