"""Long-context fine-tuning of the whole Kimi-Linear-48B-A3B on one GPU: tokens/s, MFU and peak memory per length.

The model and the step are train_48b.py's (random weights built layer by layer, in bf16 or quantised; LoRA r=16,
alpha=32 on every linear; kimitune's TrainStep; one sequence of random tokens per step), with every decoder layer
recomputed and computed in pieces of ``--piece`` tokens along the sequence (``sequence_piece_len``,
kimitune/model/pieces.py): activations then grow with the piece, and what grows with the sequence is the layers'
inputs (27 x T x 2304 x 2 B) and the MLA layers' latents. MFU counts causal attention's FLOPs (train_gpu.py's
``flops_per_token``). Lengths run from the shortest up and stop at the first that does not fit; the last line
names the longest that fitted. ``--cap-gib`` caps the process's GPU memory (``set_per_process_memory_fraction``), as
on a smaller card.

``--peer`` runs the peer instead (issue 21 asks for its longest sequence beside ours): transformers'
``KimiLinearForCausalLM`` + PEFT's LoRA (benchmarks/lora_peers.py's ``build_peer``, as train_gpu.py's peer rows) on
the same random bf16 weights, gradient checkpointing on every layer (its longest setting), the loss from full logits
as transformers computes it; the piece, tiling and offloading options are kimitune's and do not apply.

    python benchmarks/train_long.py --bits 16 --seq 32768,65536,131072,262144           # H200, bf16 weights
    python benchmarks/train_long.py --bits 8 --seq 65536,131072,262144 --cap-gib 80 --offload  # an 80 GB card
    python benchmarks/train_long.py --bits 4 --seq 1048576 --steps 3                    # 1M tokens, NF4 weights
    python benchmarks/train_long.py --peer --seq 8192,16384,24576,32768 --steps 1       # the peer's longest
    python benchmarks/train_long.py --smoke                                             # the CPU: the script only
"""

from __future__ import annotations

import argparse
import json

import torch

import lora_peers  # benchmarks/lora_peers.py
from kimitune.model import KimiLinearConfig, RunOptions
from kimitune.ops import prefix_attention
from kimitune.quant import QuantSpec, weight_bytes
from train_48b import GiB, build, cap_memory, run_seq, smoke_config  # benchmarks/train_48b.py


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
    parser.add_argument("--attention", choices=("auto", "cudnn", "flash"), default="auto",
                        help="MLA's attention over earlier pieces (kimitune.ops.prefix_attention.BACKEND; auto: "
                             "cuDNN on Hopper)")
    parser.add_argument("--peer", action="store_true", help="transformers + PEFT instead of kimitune (bf16)")
    parser.add_argument("--smoke", action="store_true", help="tiny depth/width on the CPU: checks the script only")
    args = parser.parse_args()
    if args.peer and args.bits != 16:
        parser.error("--peer runs bf16 weights (--bits 16)")

    prefix_attention.BACKEND = args.attention
    device = "cpu" if args.smoke else "cuda"
    cfg = smoke_config() if args.smoke else KimiLinearConfig.preset("kimi-linear-48b-a3b")
    seqs = sorted(int(s) for s in args.seq.split(","))
    piece = args.piece
    if args.smoke:
        seqs, piece = [min(s, 96 * (i + 1)) for i, s in enumerate(seqs[:2])], 64
    cap_gib = cap_memory(args.cap_gib) if device == "cuda" else None
    spec = None if args.bits == 16 else QuantSpec(args.bits, "nf4", False)
    model, build_s = build(cfg, spec, device, torch.float32 if args.smoke else torch.bfloat16, experts=False,
                           lora=not args.peer)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    tool = "the peer (transformers + PEFT)" if args.peer else f"pieces of {piece} tokens"
    print(f"{gpu}: {args.bits}-bit weights {weight_bytes(model) / GiB:.1f} GiB, built in {build_s:.0f} s; {tool}; "
          f"cap {f'{cap_gib:.1f}' if cap_gib else '-'} GiB", flush=True)
    if args.peer:
        run_row = peer_rows(cfg, model, args.warmup, args.steps, device)
        del model  # its tensors live on in the peer's state dict
        piece = None
    else:
        options = RunOptions(recompute_layers=model.recomputed_layers(), sequence_piece_len=piece,
                             mlp_shards=lora_peers.mlp_shards(args.tiled_mlp))

        def run_row(seq: int) -> dict:
            return run_seq(model, cfg, seq, args.warmup, args.steps, device, options, offload=args.offload,
                           progress=True)
    rows, longest = [], None
    for seq in seqs:
        result = run_row(seq)
        result.update(tool="peer" if args.peer else "kimitune", attention=prefix_attention.route(torch.device(device)),
                      bits=args.bits, seq=seq, piece=piece, cap_gib=cap_gib, offload=args.offload,
                      tiled_mlp=args.tiled_mlp)
        rows.append(result)
        print(json.dumps(result), flush=True)
        if result.get("oom"):
            break
        longest = seq
    print("\n| tool | bits | seq | piece | offload | cap GiB | tokens/s | MFU | peak allocated GiB | losses |\n"
          + "|---" * 10 + "|")
    for r in rows:
        speed = "OOM" if r.get("oom") else f"{r['tokens_per_s']:.0f}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"| {r['tool']} | {r['bits']} | {r['seq']} | {r['piece'] or '-'} | {'yes' if r['offload'] else 'no'} | "
              f"{r['cap_gib'] or '-'} | "
              f"{speed} | {mfu} | "
              f"{r.get('peak_allocated_gib', float('nan')):.1f} | {r.get('losses', '-')} |")
    print(f"longest that fitted: {longest}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def peer_rows(cfg: KimiLinearConfig, model, warmup: int, steps: int, device: str):
    """``model``'s weights (kimitune's, built without LoRA) in the peer -> ``row(seq) -> dict`` as ``run_seq``'s:
    train_gpu.py's ``measure`` of the peer (its model built anew for each length around the same weight tensors,
    which it assigns: no copy), its keys renamed to this script's."""
    import train_gpu  # benchmarks/train_gpu.py

    train_gpu.DEVICE = device
    state = model.state_dict()

    def row(seq: int) -> dict:
        result = train_gpu.measure(cfg, state, train_gpu.Row("peer", seq, ckpt=True), warmup, steps)
        out = {"oom": True} if result.get("oom") else {
            "tokens_per_s": result["tokens_per_s"], "step_s": result["step_ms"] / 1000, "mfu": result.get("mfu"),
            "losses": [round(result["first_loss"], 4)]}
        out["peak_allocated_gib"] = result["peak_gib"]
        return out

    return row


if __name__ == "__main__":
    main()
