"""KDA on CPU: kimitune's chunkwise kernel against transformers' own PyTorch fallback, forward + backward.

    python benchmarks/kda_cpu.py                      # B=1, T=2048, H=4, K=V=64, float32, 2 threads
    python benchmarks/kda_cpu.py --seq-len 4096 --threads 1 --repeats 5

Both implementations get the same realistic inputs (q and k l2-normalised in the kernel, g = -exp(A_log) *
softplus(.) as the KDA layer computes it, beta = sigmoid(.)), one warm-up run, then the median of ``--repeats``
timed runs of forward + backward. Also prints the largest output and gradient differences between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kimitune.ops.kda.chunk import chunk_kda_reference

KdaFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def make_inputs(batch: int, seq_len: int, heads: int, head_dim: int, seed: int) -> list[torch.Tensor]:
    """q, k, v [B, T, H, D]; g [B, T, H, D] (per-channel log decay); beta [B, T, H]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)
    q = torch.randn(shape, generator=gen)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    # The KDA layer's gate: A = exp(A_log) with A_log ~ log U(1, 16) per head, dt_bias ~ softplus^-1 of [1e-3, 0.1].
    A = torch.empty(1, 1, heads, 1).uniform_(1, 16, generator=gen)
    dt = torch.exp(torch.empty(heads * head_dim).uniform_(-6.9, -2.3, generator=gen))
    dt_bias = (dt + torch.log(-torch.expm1(-dt))).view(1, 1, heads, head_dim)
    g = -A * F.softplus(torch.randn(shape, generator=gen) + dt_bias)
    beta = torch.randn(batch, seq_len, heads, generator=gen).sigmoid()
    return [q, k, v, g, beta]


def forward_backward(fn: KdaFn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """One forward + backward; returns [o, dq, dk, dv, dg, dbeta]."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o = fn(*leaves, use_qk_l2norm_in_kernel=True)[0]
    o.backward(grad_out)
    return [o.detach()] + [x.grad for x in leaves]


def median_seconds(fn: KdaFn, inputs: list[torch.Tensor], grad_out: torch.Tensor, repeats: int):
    """Median (wall, process CPU) seconds of forward + backward, after a warm-up. CPU time sums all threads and
    leaves out time spent waiting for a core, so it is steadier than wall time on a shared machine."""
    forward_backward(fn, inputs, grad_out)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        forward_backward(fn, inputs, grad_out)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of kimitune (transformers: min(3, this))")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.seq_len, args.heads, args.head_dim, args.seed)
    grad_out = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(args.seed + 1))

    ours = forward_backward(chunk_kda_reference, inputs, grad_out)
    theirs = forward_backward(chunk_kimi_delta_attention, inputs, grad_out)
    names = ["o", "dq", "dk", "dv", "dg", "dbeta"]
    diffs = ", ".join(f"{n} {(a - b).abs().max().item():.1e}" for n, a, b in zip(names, ours, theirs))

    wall_ours, cpu_ours = median_seconds(chunk_kda_reference, inputs, grad_out, args.repeats)
    wall_theirs, cpu_theirs = median_seconds(chunk_kimi_delta_attention, inputs, grad_out, min(3, args.repeats))

    shape = f"B={args.batch} T={args.seq_len} H={args.heads} K=V={args.head_dim} float32, {args.threads} threads"
    print(f"KDA forward+backward, {shape} (medians of timed runs after a warm-up)")
    print(f"{'implementation':<58} {'wall':>9} {'speed-up':>9} {'CPU time':>9}")
    rows = [
        ("transformers chunk_kimi_delta_attention (PyTorch fallback)", wall_theirs, cpu_theirs),
        ("kimitune chunk_kda (PyTorch chunkwise)", wall_ours, cpu_ours),
    ]
    for name, wall, cpu in rows:
        print(f"{name:<58} {wall * 1e3:>7.1f}ms {wall_theirs / wall:>8.1f}x {cpu * 1e3:>7.1f}ms")
    print(f"max |kimitune - transformers|: {diffs}")


if __name__ == "__main__":
    main()
