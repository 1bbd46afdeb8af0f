"""The KDA short conv's training case (causal depthwise conv + SiLU, no bias, no states) on the GPU: fla-core's
kernels against kimitune's (``kimitune/ops/short_conv.py``), forward and forward + backward, and kimitune's over
a sweep of block sizes.

    python benchmarks/short_conv_gpu.py                          # 4096 and 8192 tokens of the 48B widths (D = 12288)
    python benchmarks/short_conv_gpu.py --tokens 4096 --configs 16x128x4,32x64x4   # + these (rows, channels, warps)

The input is one packed row of three sequences (fla also on one unpacked sequence, its other path; kimitune's
kernels take both the same way); the weight is frozen (LoRA training), so only dx is computed. "q k v apart": the
output as three tensors, as the KDA layer takes it.
"""

from __future__ import annotations

import argparse
import torch

from kimitune.ops import short_conv as cs
from kimitune.ops.conv import sequence_positions
from kimitune.ops.kda import fla


def timed(fn, reps: int = 20) -> float:
    """Mean milliseconds of ``fn()`` over ``reps`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--channels", type=int, default=12288, help="D: q, k and v of 32 heads of 128")
    parser.add_argument("--configs", default="", help="comma-separated ROWSxCHANNELSxWARPS block configs to time too")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    print("| impl | tokens | config | forward ms | forward + backward ms | GB/s (backward's x, dy, dx) |")
    print("|---|---|---|---|---|---|")
    for T in map(int, args.tokens.split(",")):
        D = args.channels
        x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(D, 4, device="cuda", dtype=torch.bfloat16) * 0.5
        grad_y = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, T // 3, T // 2, T], dtype=torch.int32, device="cuda")
        pos = sequence_positions(1, T, cu, x.device).to(torch.int32)
        flat, flat_grad = x.detach().view(T, D), grad_y.view(T, D)

        cu_host = cu.cpu()  # as the model passes it: fla builds its chunk indices on the host, no sync

        def fla_fwd(packed=True):
            return fla.causal_conv1d(x, weight, None, "silu", None, False, cu_host if packed else None)[0]

        def fla_both(packed=True):
            fla_fwd(packed).backward(grad_y)

        def ours(cfg, parts=1):
            return lambda: cs.conv_silu_forward_triton(flat, weight, pos, parts, *cfg)

        def ours_both(cfg, parts=1):
            grads = tuple(g.contiguous() for g in flat_grad.chunk(parts, dim=-1))

            def run():
                cs.conv_silu_forward_triton(flat, weight, pos, parts, *cfg)
                cs.conv_silu_backward_triton(flat, weight, pos, grads, False, *cfg)
            return run

        bytes_bwd = 3 * T * D * 2
        for packed in (True, False):
            f, b = timed(lambda: fla_fwd(packed)), timed(lambda: fla_both(packed))
            label = "fla, packed" if packed else "fla, one sequence"
            print(f"| {label} | {T} | - | {f:.3f} | {b:.3f} | {bytes_bwd / (b - f) / 1e6:.0f} |")
        configs = [(cs.BLOCK_T, cs.BLOCK_D, cs.NUM_WARPS)]
        configs += [tuple(map(int, c.split("x"))) for c in args.configs.split(",") if c]
        for cfg in configs:
            f, b = timed(ours(cfg)), timed(ours_both(cfg))
            print(f"| kimitune | {T} | {cfg} | {f:.3f} | {b:.3f} | {bytes_bwd / (b - f) / 1e6:.0f} |", flush=True)
        f, b = timed(ours(configs[0], 3)), timed(ours_both(configs[0], 3))
        print(f"| kimitune, q k v apart | {T} | {configs[0]} | {f:.3f} | {b:.3f} | {bytes_bwd / (b - f) / 1e6:.0f} |")


if __name__ == "__main__":
    main()
