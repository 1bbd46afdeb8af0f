"""Where decode time goes on the GPU: prefill wall-clock per context (twice each), then a profile of one prefill and
of 8 decode steps (top ops by CUDA time and by CPU time). The model is benchmarks/decode.py's GPU model.

    python scripts/device/profile_decode.py [--contexts 1024,4096]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from decode import build_models  # noqa: E402

from kimitune.infer import GenerationCache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="1024,4096")
    args = parser.parse_args()
    device = torch.device("cuda")
    config, model, _ = build_models(device, torch.bfloat16, with_transformers=False)
    contexts = [int(c) for c in args.contexts.split(",")]
    for context in contexts:
        prompt = torch.randint(3, config.vocab_size, (context,)).tolist()
        for attempt in range(2):
            cache = GenerationCache(model)
            torch.cuda.synchronize()
            start = time.perf_counter()
            logits = cache.prefill([prompt])
            torch.cuda.synchronize()
            print(f"prefill {context} try {attempt}: {time.perf_counter() - start:.3f} s", flush=True)
    cache = GenerationCache(model)
    prompt = torch.randint(3, config.vocab_size, (contexts[-1],)).tolist()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        logits = cache.prefill([prompt])
        torch.cuda.synchronize()
    table = prof.key_averages()
    print("## prefill, by CUDA time\n" + table.table(sort_by="cuda_time_total", row_limit=15))
    print("## prefill, by CPU time\n" + table.table(sort_by="cpu_time_total", row_limit=15))
    token = logits.argmax(-1)
    for _ in range(3):
        token = cache.step(token).argmax(-1)
        token.tolist()
    torch.cuda.synchronize()
    times = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            start = time.perf_counter()
            token = cache.step(token).argmax(-1)
            token.tolist()
            times.append(time.perf_counter() - start)
    print("decode step ms:", [round(1000 * t, 1) for t in times])
    table = prof.key_averages()
    print("## decode, by CUDA time\n" + table.table(sort_by="cuda_time_total", row_limit=15))
    print("## decode, by CPU time\n" + table.table(sort_by="cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
