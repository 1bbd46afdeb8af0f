"""The experts' frozen products with float8 weights (issue 24): which way of multiplying is fastest, measured.

The 48B's expert stacks (256 experts; gate_up [E, 2048, 2304], down [E, 2304, 1024]), ``--tokens`` tokens routed
top-8 evenly (8192 tokens: 65,536 rows, 256 per expert). Each variant computes a projection's forward
``y = x W_e^T`` and its input gradient ``dX = dY W_e`` (the weights are frozen: no dW), timed with CUDA events
(median of ``--repeats`` calls after warm-up), and its relative error against float32 products of the dequantised
weight:

- ``bf16``: ``torch._grouped_mm`` on bf16 weights, the speed to reach (what the bf16 model runs);
- ``dequant eager``: the e4m3 stack dequantised by ``kimitune.quant.formats.dequantize_fp8`` (float32 on the way),
  then ``_grouped_mm`` (what fp8 runs today, forward and backward);
- ``dequant bf16 mul``: e4m3 -> bf16 (exact), then one in-place multiply by the row scales in float32;
- ``dequant triton``: one Triton kernel reads e4m3 and the scales and writes bf16;
- ``kimitune row-scaled``: ``kimitune.ops.quant_grouped_mm``, what kimitune runs: one Triton grouped product that
  dequantises each weight tile in registers and multiplies in bf16 (no dequantised stack);
- ``kimitune fp8 products``: the same kernel multiplying e4m3 by e4m3 (Hopper's FP8 rate), each row's activations
  scaled to e4m3 per 128 contracted columns in registers (the output gradient's times the weight's row scales first),
  float32 accumulation per block;
- ``scaled fp8``: ``torch._scaled_grouped_mm`` on e4m3 operands (``use_fast_accum`` on and off), the activations
  (and output gradients, times the weight's row scales gathered per row) scaled to e4m3 per row on the fly; the
  backward needs the stack transposed (an e4m3 copy).

    python benchmarks/fp8_grouped.py                        # H200: 8192 tokens
    python benchmarks/fp8_grouped.py --tokens 4096,8192,32768 --json fp8_grouped.json
    python benchmarks/fp8_grouped.py --smoke                # small shapes on the CPU: the variants that run there

The times include every cast and copy a variant needs (the activations' quantisation, the dequantisation, the
transposed copy), as a training step would pay them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kimitune.quant.formats import FP8_MAX, dequantize_fp8, quantize_fp8, quantize_rows_fp8
from kimitune.ops.fp8_rows import quantize_rows_e4m3
from kimitune.ops.quant_grouped_mm import row_scaled_grouped_mm
from kimitune.ops.triton_utils import cdiv, jit_on_first_use

tl = None  # triton.language, bound at the first launch (kimitune.ops.triton_utils)

SHAPES = {"gate_up": (2048, 2304), "down": (2304, 1024)}  # projection -> (out, in) of each expert


def _dequant_kernel(q_ptr, s_ptr, out_ptr, COLS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < COLS
    q = tl.load(q_ptr + row * COLS + cols, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + row)
    tl.store(out_ptr + row * COLS + cols, (q * s).to(out_ptr.dtype.element_ty), mask=mask)


dequant_kernel = jit_on_first_use(_dequant_kernel)


def dequant_triton(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows, cols = q.numel() // q.shape[-1], q.shape[-1]
    dequant_kernel[(rows, cdiv(cols, 1024))](q, scale, out, COLS=cols, BLOCK=1024)
    return out


def dequant_bf16_mul(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype).mul_(scale.unsqueeze(-1))


def grouped(x, w, offs):
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


def dequant_variant(dequant):
    def forward(x, q, scale, offs):
        return grouped(x, dequant(q, scale, torch.bfloat16), offs)

    def backward(dy, q, scale, offs, rows_expert):
        return torch._grouped_mm(dy, dequant(q, scale, torch.bfloat16), offs=offs)  # dX_e = dY_e W_e

    return forward, backward


def row_scaled_variant(fp8_products: bool):
    """kimitune's kernel (kimitune.ops.quant_grouped_mm): each weight tile dequantised in registers, or, with
    ``fp8_products``, multiplied in e4m3 with the activations scaled per row and 128 columns in registers."""
    def forward(x, q, scale, offs):
        return row_scaled_grouped_mm(x, q, scale, offs, transpose=True, int8=False, fp8_products=fp8_products)

    def backward(dy, q, scale, offs, rows_expert):
        return row_scaled_grouped_mm(dy, q, scale, offs, transpose=False, int8=False, fp8_products=fp8_products)

    return forward, backward


def scaled_variant(fast: bool):
    def forward(x, q, scale, offs):
        x_q, x_s = quantize_rows_e4m3(x, None, FP8_MAX)  # kimitune's one-kernel activation scaling
        return torch._scaled_grouped_mm(x_q, q.transpose(-2, -1), x_s.squeeze(-1), scale, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=fast)

    def backward(dy, q, scale, offs, rows_expert):
        g_q, g_s = quantize_rows_fp8(dy.float() * scale[rows_expert])  # dY diag(s_e): the weight's scales moved over
        q_t = q.transpose(-2, -1).contiguous().transpose(-2, -1)  # [E, out, in], column-major: b of dY @ W
        ones = torch.ones(q.shape[0], q.shape[2], dtype=torch.float32, device=q.device)
        return torch._scaled_grouped_mm(g_q, q_t, g_s.squeeze(-1), ones, offs=offs, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)

    return forward, backward


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="8192")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="small shapes on the CPU")
    args = parser.parse_args()
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    shapes = {k: (o // 16, i // 16) for k, (o, i) in SHAPES.items()} if args.smoke else SHAPES
    experts = 8 if args.smoke else args.experts
    token_counts = [64] if args.smoke else [int(t) for t in args.tokens.split(",")]
    variants = {"bf16": None, "dequant eager": dequant_variant(dequantize_fp8),
                "dequant bf16 mul": dequant_variant(dequant_bf16_mul)}
    if cuda:
        variants |= {"dequant triton": dequant_variant(dequant_triton), "kimitune row-scaled": row_scaled_variant(False),
                     "kimitune fp8 products": row_scaled_variant(True),
                     "scaled fp8": scaled_variant(False),
                     "scaled fp8 fast accum": scaled_variant(True)}
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; e4m3 max {FP8_MAX:g}")
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for tokens in token_counts:
        n = tokens * args.top_k
        counts = torch.full((experts,), n // experts, dtype=torch.int32)
        counts[: n % experts] += 1
        offs = counts.cumsum(0).to(torch.int32).to(device)
        rows_expert = torch.repeat_interleave(torch.arange(experts), counts.long()).to(device)
        for name, (out, inp) in shapes.items():
            w = (torch.randn(experts, out, inp, device=device, generator=g) * 0.02).bfloat16()
            q, scale = quantize_fp8(w)
            w_deq = dequantize_fp8(q, scale, torch.float32)
            x = torch.randn(n, inp, device=device, generator=g).bfloat16()
            dy = (torch.randn(n, out, device=device, generator=g) * 1e-3).bfloat16()
            want_y = torch.cat([x[s:e].float() @ w_deq[i].T for i, (s, e) in
                                enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
            want_dx = torch.cat([dy[s:e].float() @ w_deq[i] for i, (s, e) in
                                 enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
            for variant, fns in variants.items():
                if fns is None:
                    w_dev = w_deq.bfloat16()
                    fwd = lambda: grouped(x, w_dev, offs)  # noqa: E731
                    bwd = lambda: torch._grouped_mm(dy, w_dev, offs=offs)  # noqa: E731
                else:
                    f, b = fns
                    fwd = lambda: f(x, q, scale, offs)  # noqa: E731
                    bwd = lambda: b(dy, q, scale, offs, rows_expert)  # noqa: E731
                try:
                    row = {"tokens": tokens, "projection": name, "variant": variant,
                           "forward_ms": timed(fwd, args.repeats, cuda), "backward_ms": timed(bwd, args.repeats, cuda),
                           "forward_error": relative_error(fwd(), want_y),
                           "backward_error": relative_error(bwd(), want_dx)}
                except (RuntimeError, NotImplementedError) as error:
                    row = {"tokens": tokens, "projection": name, "variant": variant, "error": str(error)[:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del w, q, scale, w_deq, x, dy, want_y, want_dx
    print("\n| tokens | projection | variant | forward ms | dX ms | both, x bf16 | forward error | dX error |\n"
          + "|---" * 8 + "|")
    base = {(r["tokens"], r["projection"]): r for r in rows if r["variant"] == "bf16" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['tokens']} | {r['projection']} | {r['variant']} | failed: {r['error'][:80]} | | | | |")
            continue
        b = base.get((r["tokens"], r["projection"]))
        ratio = (b["forward_ms"] + b["backward_ms"]) / (r["forward_ms"] + r["backward_ms"]) if b else float("nan")
        print(f"| {r['tokens']} | {r['projection']} | {r['variant']} | {r['forward_ms']:.3f} | {r['backward_ms']:.3f} | "
              f"{ratio:.2f}x | {r['forward_error']:.4f} | {r['backward_error']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
