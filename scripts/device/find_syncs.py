"""Where a LoRA training step synchronises the host with the GPU (run on the device machine).

Builds benchmarks/train_gpu.py's model (48B widths, 4 layers, bf16, LoRA r=16 all-linear), runs two warm-up steps,
then one step under ``torch.cuda.set_sync_debug_mode("warn")`` and prints each synchronising call with the
kimitune / fla / cut-cross-entropy frames that led to it; once on one unpacked sequence of 4096 tokens and once
packed (three sequences, ``cu_seqlens`` on the host as the trainer passes it).

    . scripts/device/setup.sh && python scripts/device/find_syncs.py

Last result (H100, 2026-11-26): no sync, unpacked or packed. The one before, the loss's ``nonzero`` over the
valid targets, is now an asynchronous copy started before the layers (``kimitune.ops.loss.LossRows``);
``tests/adapters/test_lora_gpu.py`` checks a packed step with ``set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings

import torch

sys.path.insert(0, "benchmarks")
from lora_peers import build_kimitune, random_state  # noqa: E402
from train_gpu import model_config  # noqa: E402

OURS = ("kimitune", "/fla/", "cut_cross")


def main() -> None:
    cfg = model_config(4, "kimi-linear-48b-a3b")
    model, _ = build_kimitune(cfg, random_state(cfg, torch.bfloat16, "cuda"), "cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 4096), device="cuda")

    def step(cu_seqlens):
        model(ids, labels=ids, cu_seqlens=cu_seqlens, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for cu_seqlens in (None, torch.tensor([0, 1000, 2500, 4096], dtype=torch.int32)):
        for _ in range(2):
            step(cu_seqlens)
        torch.cuda.synchronize()
        sites = collections.Counter()

        def record(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-2] if any(mark in f.filename for mark in OURS)]
            sites[(str(message)[:60], " <- ".join(f"{f.filename}:{f.lineno}" for f in frames[-3:][::-1]))] += 1

        with warnings.catch_warnings():
            warnings.showwarning = record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step(cu_seqlens)
            torch.cuda.set_sync_debug_mode("default")
        print(f"--- {'packed' if cu_seqlens is not None else 'one sequence'}: {sum(sites.values())} calls")
        for (message, where), count in sites.most_common(30):
            print(count, message, "|", where)


if __name__ == "__main__":
    main()
