"""The MoE combine's sum of each token's k expert rows (``kimitune.ops.expert_combine``) on the GPU, against the
bytes it must move, and over block configurations.

    python benchmarks/expert_combine_gpu.py                                  # 4096 and 8192 tokens, 48B widths
    python benchmarks/expert_combine_gpu.py --configs 256x1,512x2,256x2      # + these (columns per program, warps)

Rows are random bf16 [N * 8, 2304] sorted by a random top-8 choice of 256 experts, as a MoE layer's down projection
leaves them. "GB/s" counts the rows read once and y written once.
"""

from __future__ import annotations

import argparse

import torch

from kimitune.ops import expert_combine
from kimitune.ops.permute import inverse_permutation
from short_conv_gpu import timed  # benchmarks/short_conv_gpu.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--hidden", type=int, default=2304)
    parser.add_argument("--configs", default="", help="comma-separated COLUMNSxWARPS configs to time too")
    args = parser.parse_args()
    k, experts = 8, 256
    print(torch.cuda.get_device_name(), torch.__version__)
    print("| tokens | config | ms | GB/s |\n|---|---|---|---|")
    for tokens in map(int, args.tokens.split(",")):
        chosen = torch.rand(tokens, experts, device="cuda").topk(k, dim=-1).indices.reshape(-1)
        inverse = inverse_permutation(torch.argsort(chosen, stable=True))
        rows = torch.randn(tokens * k, args.hidden, device="cuda", dtype=torch.bfloat16)
        moved = (tokens * k + tokens) * args.hidden * 2
        ms = timed(lambda: expert_combine.sum_token_copies(rows, inverse, k), reps=50)
        print(f"| {tokens} | default | {ms:.3f} | {moved / ms / 1e6:.0f} |", flush=True)
        for cfg in filter(None, args.configs.split(",")):
            block, warps = map(int, cfg.split("x"))
            ms = timed(lambda: expert_combine.sum_token_copies_triton(rows, inverse, k, block, warps), reps=50)
            print(f"| {tokens} | {cfg} | {ms:.3f} | {moved / ms / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
