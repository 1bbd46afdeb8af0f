"""Long-context fine-tuning of the whole Kimi-Linear-48B-A3B on one GPU: tokens/s, MFU and peak memory per length.

The model and the step are train_48b.py's (random weights built layer by layer, in bf16 or quantised; LoRA r=16,
alpha=32 on every linear; kimitune's TrainStep; one sequence of random tokens per step), with every decoder layer
recomputed and computed in pieces of ``--piece`` tokens along the sequence (``sequence_piece_len``,
kimitune/model/pieces.py): activations then grow with the piece, and what grows with the sequence is the layers'
inputs (27 x T x 2304 x 2 B) and the MLA layers' latents. MFU counts causal attention's FLOPs (train_gpu.py's
``flops_per_token``). Lengths run from the shortest up and stop at the first that does not fit; the last line
names the longest that fitted. ``--cap-gib`` caps the process's GPU memory (``set_per_process_memory_fraction``), as
on a smaller card.

    python benchmarks/train_long.py --bits 16 --seq 32768,65536,131072,262144           # H200, bf16 weights
    python benchmarks/train_long.py --bits 8 --seq 65536,131072,262144 --cap-gib 80 --offload  # an 80 GB card
    python benchmarks/train_long.py --bits 4 --seq 1048576 --steps 3                    # 1M tokens, NF4 weights
    python benchmarks/train_long.py --smoke                                             # the CPU: the script only
"""

from __future__ import annotations

import argparse
import json

import torch

import lora_peers  # benchmarks/lora_peers.py
from kimitune.model import KimiLinearConfig, RunOptions
from kimitune.quant import QuantSpec, weight_bytes
from train_48b import GiB, build, run_seq, smoke_config  # benchmarks/train_48b.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, choices=(16, 8, 4), default=16)
    parser.add_argument("--seq", default="32768,65536,131072,262144", help="comma-separated lengths, shortest first")
    parser.add_argument("--piece", type=int, default=16384, help="sequence_piece_len: tokens per piece")
    parser.add_argument("--tiled-mlp", nargs="?", const="auto", default=None,
                        help="tiled_mlp: every layer's MLP / MoE in this many shards of each piece (no number: about "
                             "hidden_size tokens a shard), each recomputed in the backward")
    parser.add_argument("--offload", action="store_true", help="activation_offloading: saved tensors on the host")
    parser.add_argument("--cap-gib", type=float, default=None, help="cap the GPU memory this process may use")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny depth/width on the CPU: checks the script only")
    args = parser.parse_args()

    device = "cpu" if args.smoke else "cuda"
    cfg = smoke_config() if args.smoke else KimiLinearConfig.preset("kimi-linear-48b-a3b")
    seqs = sorted(int(s) for s in args.seq.split(","))
    piece = args.piece
    if args.smoke:
        seqs, piece = [min(s, 96 * (i + 1)) for i, s in enumerate(seqs[:2])], 64
    if args.cap_gib and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / total))
    spec = None if args.bits == 16 else QuantSpec(args.bits, "nf4", False)
    model, build_s = build(cfg, spec, device, torch.float32 if args.smoke else torch.bfloat16, experts=False)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{gpu}: {args.bits}-bit weights {weight_bytes(model) / GiB:.1f} GiB, built in {build_s:.0f} s; pieces of "
          f"{piece} tokens; cap {args.cap_gib or '-'} GiB", flush=True)
    mlp_shards = lora_peers.mlp_shards(args.tiled_mlp)
    options = RunOptions(recompute_layers=model.recomputed_layers(), sequence_piece_len=piece, mlp_shards=mlp_shards)
    rows, longest = [], None
    for seq in seqs:
        result = run_seq(model, cfg, seq, args.warmup, args.steps, device, options, offload=args.offload,
                         progress=True)
        result.update(bits=args.bits, seq=seq, piece=piece, cap_gib=args.cap_gib, offload=args.offload,
                      tiled_mlp=args.tiled_mlp)
        rows.append(result)
        print(json.dumps(result), flush=True)
        if result.get("oom"):
            break
        longest = seq
    print("\n| bits | seq | piece | offload | cap GiB | tokens/s | MFU | peak allocated GiB | losses |\n" + "|---" * 9 + "|")
    for r in rows:
        speed = "OOM" if r.get("oom") else f"{r['tokens_per_s']:.0f}"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"| {r['bits']} | {r['seq']} | {r['piece']} | {'yes' if r['offload'] else 'no'} | {r['cap_gib'] or '-'} | "
              f"{speed} | {mfu} | "
              f"{r.get('peak_allocated_gib', float('nan')):.1f} | {r.get('losses', '-')} |")
    print(f"longest that fitted: {longest}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
