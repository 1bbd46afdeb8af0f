"""The LM head's cross-entropy on one GPU: kimitune's fused function against cut-cross-entropy and full logits.

Kimi-Linear-48B-A3B's head (hidden 2304, vocab 163840): bf16 hidden states [N, 2304] that require grad (random
values, RMS-normed as the final norm leaves them, so the logits spread as a model's do), a frozen bf16 head
(randn * 0.02), random targets with about 5% ignored (-100). For each N in ``--rows`` and each implementation it
times forward + backward (CUDA events, mean of ``--steps`` after ``--warmup``) and the peak memory beyond the
inputs (the logits, their gradient, the workspace, and hidden's gradient):

- fused: ``kimitune.ops.loss.chunked_linear_cross_entropy`` (``linear_cross_entropy(impl="fused")``; the
  gradient computed in the forward, two GEMMs per chunk, the Triton softmax-gradient kernel);
- cce: ``linear_cross_entropy(impl="cce")``, cut-cross-entropy's kernels (when installed);
- full logits: hidden @ W.T -> .float() -> F.cross_entropy, as transformers computes the loss (skipped where its
  [N, V] tensors, about 18 bytes per logit, would pass ``--max-gib``).

At the first N it also reports each one's largest absolute difference in the loss and in grad_hidden from a float32
reference (float32 hidden and head, full logits, autograd).

    python benchmarks/loss_gpu.py
    python benchmarks/loss_gpu.py --rows 16384 --impls fused --chunk-rows 512 --block-v 8192 --num-warps 16
    python benchmarks/loss_gpu.py --train-head      # the head trains too (full fine-tuning): grad_weight as well
    python benchmarks/loss_gpu.py --device cpu      # N=256, V=4096, C=64 on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kimitune.ops import softmax_grad
from kimitune.ops.loss import chunked_linear_cross_entropy, linear_cross_entropy

FULL_LOGITS_BYTES = 18  # per logit: bf16 logits, float32 copy, log-softmax, and two float32 gradients


def inputs(rows: int, hidden: int, vocab: int, device: str, train_head: bool, seed: int = 0):
    """hidden [rows, hidden] bf16 (requires grad), weight [vocab, hidden] bf16, targets [rows] with ~5% -100."""
    generator = torch.Generator(device).manual_seed(seed)
    h = torch.randn(rows, hidden, device=device, generator=generator)
    h = F.rms_norm(h, (hidden,)).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=generator) * 0.02).bfloat16().requires_grad_(train_head)
    targets = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    targets[torch.rand(rows, device=device, generator=generator) < 0.05] = -100
    return h, w, targets


def full_logits(h, w, targets):
    return F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100)


def loss_fns(args) -> dict:
    """Implementation name -> loss(h, w, targets), for those in ``--impls`` that can run here."""
    fns = {
        "fused": lambda h, w, t: chunked_linear_cross_entropy(h, w, t, "mean", chunk_rows=args.chunk_rows),
        "cce": lambda h, w, t: linear_cross_entropy(h, w, t, "mean", impl="cce"),
        "full logits": full_logits,
    }
    wanted = [{"full": "full logits"}.get(name, name) for name in args.impls.split(",")]
    if "cce" in wanted and (args.device != "cuda" or not _has_cce()):
        print("cce: skipped (needs CUDA and cut-cross-entropy)")
        wanted.remove("cce")
    return {name: fns[name] for name in wanted}


def _has_cce() -> bool:
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


class Clock:
    """Elapsed milliseconds between ``start()`` and ``stop()``: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.begin.elapsed_time(end)
        return 1000 * (time.perf_counter() - self.begin)


def step(fn, h, w, targets) -> torch.Tensor:
    """One forward + backward from clean gradients; returns the loss."""
    h.grad = w.grad = None
    loss = fn(h, w, targets)
    loss.backward()
    return loss


def measure(fn, h, w, targets, args) -> dict:
    """Mean forward + backward time and the peak memory beyond the inputs, over the timed steps."""
    cuda = args.device == "cuda"
    clock = Clock(args.device)
    for _ in range(args.warmup):
        step(fn, h, w, targets)
    h.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        clock.start()
        step(fn, h, w, targets)
        times.append(clock.stop())
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return {"ms": sum(times) / len(times), "peak_gib": peak}


def reference(h, w, targets) -> tuple[float, torch.Tensor]:
    """Loss and grad_hidden in float32 throughout (float32 copies of the inputs, full logits)."""
    hf = h.detach().float().requires_grad_()
    loss = F.cross_entropy(hf @ w.detach().float().T, targets, ignore_index=-100)
    loss.backward()
    return loss.item(), hf.grad


def errors(fn, h, w, targets, ref_loss: float, ref_grad: torch.Tensor) -> dict:
    """Absolute difference of the loss, largest absolute difference of grad_hidden, from the reference's."""
    loss = step(fn, h, w, targets)
    return {"loss_diff": abs(loss.item() - ref_loss), "grad_diff": (h.grad.float() - ref_grad).abs().max().item()}


def run_rows(rows: int, fns: dict, args, first: bool) -> list[dict]:
    """Every implementation at N = ``rows``; with ``first``, their differences from the float32 reference too."""
    h, w, targets = inputs(rows, args.hidden, args.vocab, args.device, args.train_head)
    if first:
        ref_loss, ref_grad = reference(h, w, targets)
    results = []
    for name, fn in fns.items():
        result = {"impl": name, "rows": rows}
        if name == "full logits" and FULL_LOGITS_BYTES * rows * args.vocab > args.max_gib * 2**30:
            result["skipped"] = f"needs ~{FULL_LOGITS_BYTES * rows * args.vocab / 2**30:.0f} GiB"
        else:
            try:
                result.update(measure(fn, h, w, targets, args))
                if first:
                    result.update(errors(fn, h, w, targets, ref_loss, ref_grad))
            except torch.cuda.OutOfMemoryError:
                result["oom"] = True
        h.grad = w.grad = None
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def print_table(results: list[dict]) -> None:
    print("\n| impl | N | fwd+bwd ms | peak GiB beyond inputs | loss abs diff | grad_hidden max abs diff |\n"
          "|---|---|---|---|---|---|")
    for r in results:
        if "ms" not in r:
            print(f"| {r['impl']} | {r['rows']} | {r.get('skipped', 'OOM')} | | | |")
            continue
        diffs = (f"{r['loss_diff']:.2e} | {r['grad_diff']:.2e}" if "loss_diff" in r else "- | -")
        print(f"| {r['impl']} | {r['rows']} | {r['ms']:.2f} | {r['peak_gib']:.2f} | {diffs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: N=256, V=4096, C=64 (unless given): checks the script only")
    parser.add_argument("--rows", default=None, help="comma-separated N (default 4096,16384; 256 on the CPU)")
    parser.add_argument("--hidden", type=int, default=None, help="C (default 2304; 64 on the CPU)")
    parser.add_argument("--vocab", type=int, default=None, help="V (default 163840; 4096 on the CPU)")
    parser.add_argument("--impls", default="fused,cce,full", help="any of fused, cce, full (full logits)")
    parser.add_argument("--train-head", action="store_true", help="the head requires grad too (full fine-tuning)")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="fused: rows per chunk (default: 256 MiB of logits)")
    parser.add_argument("--block-v", type=int, default=None, help="fused: the kernel's columns per step")
    parser.add_argument("--num-warps", type=int, default=None, help="fused: the kernel's warps per row")
    parser.add_argument("--max-gib", type=float, default=70.0, help="full logits: skip N above this estimate")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    cpu = args.device == "cpu"
    args.rows = args.rows or ("256" if cpu else "4096,16384")
    args.hidden = args.hidden or (64 if cpu else 2304)
    args.vocab = args.vocab or (4096 if cpu else 163840)
    if args.block_v:
        softmax_grad.BLOCK_V = args.block_v
    if args.num_warps:
        softmax_grad.NUM_WARPS = args.num_warps
    name = torch.cuda.get_device_name() if not cpu else "cpu"
    print(f"{name}: C={args.hidden}, V={args.vocab}, head {'trained' if args.train_head else 'frozen'}, "
          f"kernel BLOCK_V={softmax_grad.BLOCK_V} num_warps={softmax_grad.NUM_WARPS}, "
          f"chunk rows {args.chunk_rows or 'default'}")
    fns = loss_fns(args)
    results = []
    for i, rows in enumerate(int(n) for n in args.rows.split(",")):
        results += run_rows(rows, fns, args, first=i == 0)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
