"""MLA's attention in a long row computed in pieces (``kimitune.ops.prefix_attention``) on the GPU: cuDNN's fused
attention against aten's flash attention, forward and forward + backward, at the 48B's widths.

One piece of ``--piece`` queries attends causally to itself and fully to ``--blocks`` earlier pieces, its own keys and
values and each earlier piece's expanded from their latents (512 + 64 per token) through a kv_b projection (32 heads x
(128 + 128)), as in ``kimitune.model.mla`` with ``sequence_piece_len``. The flash route pads the values from 128 to
the keys' 192 (flash attention takes one head size); cuDNN takes them as they are. TFLOP/s counts the useful attention
work only (causal own block: half the pairs; 2 x H x (192 + 128) FLOPs a pair forward, 2.5 times that backward), not
the expansions. The two routes' outputs and gradients are compared: the script fails if they are further apart than
bf16 rounding allows. ``--key-layouts model,tokens`` also times keys laid out per token in memory, as the queries and
values are (the model builds them per head), to see whether the fused kernels care.

    python benchmarks/prefix_attention_gpu.py                       # piece 16384, 0 and 3 earlier pieces
    python benchmarks/prefix_attention_gpu.py --piece 8192 --blocks 0,1,7
    python benchmarks/prefix_attention_gpu.py --blocks 3 --key-layouts model,tokens
    python benchmarks/prefix_attention_gpu.py --smoke               # the CPU route, tiny: checks the script only
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from kimitune.ops import prefix_attention as module

HEADS, NOPE, ROPE, V_DIM, RANK = 32, 128, 64, 128, 512
KEY_LAYOUTS = ("model", "tokens")


def inputs(piece: int, blocks: int, device: str, dtype: torch.dtype, heads: int, key_layout: str, seed: int = 0):
    """(q, own latent, own shared key, earlier blocks' latents, expand, kv_b weight) of one piece; the leaves need
    gradients. The piece's own keys and values are expanded from its latents too, as in the MLA layer.
    ``key_layout``: "model" builds the keys as ``KimiLinearMLA._expand`` does (concatenated per head: [B, H, S, D]
    in memory); "tokens" concatenates them per token ([B, S, H, D] in memory, the layout q and the values have)."""
    generator = torch.Generator(device).manual_seed(seed)
    kv_b = nn.Linear(RANK, heads * (NOPE + V_DIM), bias=False, device=device, dtype=dtype)
    nn.init.normal_(kv_b.weight, std=RANK ** -0.5, generator=generator)

    def expand(latent, shared):
        B, S = latent.shape[:2]
        kv = kv_b(latent).view(B, S, heads, NOPE + V_DIM)
        k_nope, v = kv.split([NOPE, V_DIM], dim=-1)
        if key_layout == "tokens":
            k = torch.cat([k_nope, shared[:, :, None].expand(-1, -1, heads, -1)], dim=-1).transpose(1, 2)
        else:
            k = torch.cat([k_nope.transpose(1, 2), shared[:, None].expand(-1, heads, -1, -1)], dim=-1)
        return k, v.transpose(1, 2)

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator).requires_grad_()

    # [B, T, H, D] transposed to [B, H, T, D], the layout the MLA layer hands over
    q = leaf(1, piece, heads, NOPE + ROPE).transpose(1, 2)
    own = leaf(1, piece, RANK), leaf(1, piece, ROPE)
    latents = [(leaf(1, piece, RANK), leaf(1, piece, ROPE)) for _ in range(blocks)]
    return q, own, latents, expand, kv_b.weight


def useful_flops(piece: int, blocks: int, heads: int) -> float:
    pairs = piece * piece / 2 + blocks * piece * piece
    return 2 * heads * (NOPE + ROPE + V_DIM) * pairs


def timed(fn, reps: int, cuda: bool) -> float:
    """Mean milliseconds of ``fn()`` over ``reps`` calls after 2 warm-up calls."""
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / reps


def run(backend: str, piece: int, blocks: int, reps: int, device: str, dtype: torch.dtype, heads: int,
        key_layout: str) -> dict:
    module.BACKEND = backend
    q, own, latents, expand, weight = inputs(piece, blocks, device, dtype, heads, key_layout)
    leaves = [q, *own, weight] + [t for block in latents for t in block]
    scale = (NOPE + ROPE) ** -0.5
    grad = torch.randn(1, heads, piece, V_DIM, device=device, dtype=dtype,
                       generator=torch.Generator(device).manual_seed(1))

    def attend():
        k, v = expand(*own)
        return module.prefix_attention(q, k, v, latents, expand, [weight], scale)

    def forward():
        with torch.no_grad():
            return attend()

    def forward_backward():
        out = attend()
        return out, torch.autograd.grad(out, leaves, grad, materialize_grads=True)

    cuda = device == "cuda"
    forward_ms = timed(forward, reps, cuda)
    train_ms = timed(forward_backward, reps, cuda)
    out, grads = forward_backward()
    flops = useful_flops(piece, blocks, heads)
    return {"backend": backend, "key_layout": key_layout, "piece": piece, "blocks": blocks, "forward_ms": forward_ms,
            "train_ms": train_ms, "forward_tflops": flops / forward_ms / 1e9,
            "train_tflops": 3.5 * flops / train_ms / 1e9,
            "_out": out.detach().float(), "_grads": [g.float() for g in grads]}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--piece", type=int, default=16384)
    parser.add_argument("--blocks", default="0,3", help="comma-separated numbers of earlier pieces")
    parser.add_argument("--backends", default="cudnn,flash")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--key-layouts", default="model",
                        help="comma-separated: model (as KimiLinearMLA._expand builds keys), tokens ([B, S, H, D])")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="the CPU route at a tiny size: checks the script only")
    args = parser.parse_args()
    layouts = args.key_layouts.split(",")
    if unknown := [layout for layout in layouts if layout not in KEY_LAYOUTS]:
        parser.error(f"--key-layouts: {', '.join(unknown)} unknown; known: {', '.join(KEY_LAYOUTS)}")
    default_backend = module.BACKEND

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    heads = 2 if args.smoke else HEADS
    piece = 64 if args.smoke else args.piece
    backends = ["flash"] if args.smoke else args.backends.split(",")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{gpu}: piece {piece}, {heads} heads, keys {NOPE + ROPE} wide, values {V_DIM}")
    rows = []
    for blocks in (int(b) for b in args.blocks.split(",")):
        results = [run(backend, piece, blocks, args.reps, device, dtype, heads, layout)
                   for layout in layouts for backend in backends]
        first = results[0]
        for r in results:
            r["out_vs_first"] = relative(r["_out"], first["_out"])
            r["grads_vs_first"] = max(relative(g, h) for g, h in zip(r["_grads"], first["_grads"]))
            print(f"{r['backend']:>6} | keys {r['key_layout']:>6} | {blocks} earlier pieces | "
                  f"forward {r['forward_ms']:8.2f} ms "
                  f"({r['forward_tflops']:5.0f} TFLOP/s) | forward + backward {r['train_ms']:8.2f} ms "
                  f"({r['train_tflops']:5.0f} TFLOP/s) | against {first['backend']}: out {r['out_vs_first']:.1e}, "
                  f"gradients {r['grads_vs_first']:.1e}", flush=True)
            rows.append({key: value for key, value in r.items() if not key.startswith("_")})
        del results, first
    module.BACKEND = default_backend
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    # two bf16 routes apart by more than bf16's rounding: one of them is wrong (exit 1, e.g. for a script to fall back)
    apart = [r for r in rows if r["out_vs_first"] > 3e-2 or r["grads_vs_first"] > 5e-2]
    if apart:
        raise SystemExit(f"the routes disagree: {apart}")


if __name__ == "__main__":
    main()
