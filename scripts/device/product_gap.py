"""Where `kimitune train`'s step loses to train_gpu.py's row (issue 20): the product's own setup and batch, timed
through TrainStep in one process with autocast on and off and with the packed batch layout or none, then a profile
of the product's step and of the plain one (the CUDA kernels that differ, and the host time per step).

    python scripts/device/product_gap.py --work /tmp/product     # after benchmarks/train_product.py --work /tmp/product
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from kimitune.config import load_config  # noqa: E402
from kimitune.train.optim import build_optimizer  # noqa: E402
from kimitune.train.settings import run_options  # noqa: E402
from kimitune.train.setup import build_training_setup  # noqa: E402
from kimitune.train.step import TrainStep  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, batch, steps: int = 12, warmup: int = 3) -> float:
    for _ in range(warmup):
        step([batch], batch.num_label_tokens)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step([batch], batch.num_label_tokens)
    sync()
    return batch.num_tokens * steps / (time.perf_counter() - start)


def profile(step, batch, label: str, out: Path | None) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step([batch], batch.num_label_tokens)
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(3):
            step([batch], batch.num_label_tokens)
        host = (time.perf_counter() - start) / 3
        sync()
        wall = (time.perf_counter() - start) / 3
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / 3
    print(f"\n== {label}: host {1e3 * host:.1f} ms/step to queue, wall {1e3 * wall:.1f} ms/step, "
          f"kernels {device_us / 1e3:.1f} ms/step")
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    if out is not None:
        (out / f"profile_{label}.txt").write_text(events.table(sort_by="self_device_time_total", row_limit=80,
                                                               max_name_column_width=100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config, _ = load_config(args.work / "train.yaml", {"output_dir": str(args.work / "gap-run")})
    setup = build_training_setup(config, Console())
    model, device = setup.model, setup.device
    packed = setup.train_batches(0)[0]
    plain = dataclasses.replace(packed, cu_seqlens=None)
    print(f"batch: {packed.num_tokens} tokens, input {tuple(packed.input_ids.shape)}, cu_seqlens {packed.cu_seqlens}, "
          f"{packed.num_label_tokens} label tokens; dtypes: "
          f"{sorted({str(p.dtype) for p in model.parameters()})}")
    options = run_options(config, model, sharded=False)
    steps = {}
    for autocast in (True, False):
        optimizer = build_optimizer(model, config, device)
        steps[autocast] = TrainStep(model, optimizer, device, options=options, max_grad_norm=config.max_grad_norm,
                                    autocast_bf16=autocast)
    print("| autocast | layout | tokens/s |\n|---|---|---|")
    for autocast in (True, False):
        for name, batch in (("packed", packed), ("none", plain)):
            print(f"| {autocast} | {name} | {timed(steps[autocast], batch) / 1e3:.1f}k |", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    profile(steps[True], packed, "product", args.out)
    profile(steps[False], plain, "plain", args.out)


if __name__ == "__main__":
    main()
