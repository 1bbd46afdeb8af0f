"""torch.compile against kimitune's hand-written kernels, at the 48B's training shapes (issue 20): keep a kernel only
where it beats the compiled PyTorch reference by more than the noise.

    python benchmarks/compile_ab.py --out compile_ab.json          # the three ops, both compile modes (GPU)
    python benchmarks/compile_ab.py --ops swiglu --modes default --repeats 5 --out quick.json
    python benchmarks/compile_ab.py --smoke --modes default        # the script on the CPU (what the tests run)

A variant whose first call (its compile) takes longer than --compile-timeout seconds is reported as such and the
others still run; under a per-command time limit, --ops runs the ops in separate calls.

The ops, at --tokens tokens (8192) of Kimi-Linear-48B-A3B (examples/models/kimi-linear-48b-a3b.json: hidden 2304,
moe_intermediate 1024, 256 experts, top-8, so M = 8 * tokens expert rows):

- swiglu: ``kimitune.ops.expert_swiglu``, gate_up [M, 2 * 1024] bf16 and weights [M] float32 -> h [M, 1024] bf16,
  forward and forward + backward (the gradients of gate_up and weights). Hand-written: its two Triton kernels.
- combine: ``kimitune.ops.expert_combine.sum_token_copies``, rows [M, 2304] bf16 sorted by a random top-8 choice of
  256 experts -> y [tokens, 2304] bf16, forward only: the op has no backward of its own (``kimitune.ops.permute``
  uses it as the combine's forward and the dispatch's backward). Hand-written: its Triton kernel.
- casts: ``kimitune.adapters.casts.CastTogether``, the float32 lora_A / lora_B of every adapted linear of the 48B
  (LoRA r=16 on every linear but the experts, as train_48b.py; read off the model built on the meta device) to bf16,
  and their bf16 gradients back to float32, forward and forward + backward. Its reference is one cast per tensor, as
  each adapted linear would cast alone; "compiled, concatenated" is torch.compile of CastTogether's own torch code
  (one concatenation, one cast, views).

Each variant runs once first: that call's outputs and gradients are checked against the eager reference's (max
abs error; also against the reference in float64) and its wall time is the compile time (Dynamo + Inductor, the
backward included; for the hand-written kernels, Triton's JIT). Each variant gets empty Inductor and Triton cache
folders (unless --warm-cache), after one throw-away compile that takes Inductor's start-up out of the first
variant's time; a kernel that an earlier variant compiled identically can still come from memory. Timing: CUDA
events around --inner calls after --warmup calls, the median over --repeats such samples, with the quartiles as
the noise. The verdict compares the hand-written kernel with the fastest compiled variant, on forward + backward
where the op has one: beyond the noise when their quartile ranges do not overlap.

The hand-written rows call the kernels' own entry points, so KIMITUNE_REFERENCE_OPS does not change them. Without
CUDA it prints why and exits 0 (writing {"skipped": ...} to --out). ``--smoke`` runs the whole script on the CPU
at a few tokens and adapters (wall-clock timer; the Triton kernels in Triton's interpreter where triton is
installed), to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

try:
    import kimitune  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimitune.ops.expert_combine import sum_token_copies_reference, sum_token_copies_triton
from kimitune.ops.expert_swiglu import _ExpertSwiGLU, expert_swiglu_reference
from kimitune.ops.permute import inverse_permutation

OPS = ("swiglu", "combine", "casts")
MODES = ("default", "max-autotune-no-cudagraphs")
MODEL = "kimi-linear-48b-a3b"
LORA_R = 16


@dataclass
class Variant:
    """One implementation of an op. ``forward()`` returns its outputs; ``step()`` (differentiable ops) runs forward
    and backward and returns outputs + input gradients."""

    name: str
    mode: str | None
    forward: Callable[[], list[torch.Tensor]]
    step: Callable[[], list[torch.Tensor]] | None


@dataclass
class Op:
    """An op at its training shapes: its variants; ``collect`` turns what ``step`` (or ``forward``) returns into the
    tensors ``outputs`` names, which are checked against the reference's and against ``truth`` (float64)."""

    name: str
    shapes: dict
    outputs: list[str]
    variants: list[Variant] = field(default_factory=list)
    collect: Callable[[list[torch.Tensor]], list[torch.Tensor]] = list
    truth: list[torch.Tensor] | None = None


def model_widths() -> dict:
    """hidden, moe_intermediate, experts, top_k of the 48B (its preset, examples/models/kimi-linear-48b-a3b.json)."""
    from kimitune.model import KimiLinearConfig

    cfg = KimiLinearConfig.preset(MODEL)
    return {"hidden": cfg.hidden_size, "intermediate": cfg.moe_intermediate_size, "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_token}


def compiled(fn: Callable, mode: str) -> Callable:
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)


def with_grads(fn: Callable, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> Callable:
    """A step: outputs of fn(*inputs), then the gradients of the inputs for ``grad_outputs``."""

    def step() -> list[torch.Tensor]:
        outputs = fn(*inputs)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        return outputs + list(torch.autograd.grad(outputs, inputs, grad_outputs))

    return step


def swiglu_op(args: argparse.Namespace, widths: dict) -> Op:
    M, I, device = args.tokens * widths["top_k"], widths["intermediate"], args.device
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up = (2 * torch.randn(M, 2 * I, device=device, generator=gen)).to(torch.bfloat16).requires_grad_()
    weights = torch.rand(M, device=device, generator=gen).requires_grad_()
    grad_h = torch.randn(M, I, device=device, generator=gen).to(torch.bfloat16)
    op = Op("swiglu", {"gate_up": [M, 2 * I], "weights": [M], "h": [M, I]}, ["h", "grad gate_up", "grad weights"])
    inputs = [gate_up, weights]

    def variant(name, mode, fn):
        return Variant(name, mode, lambda: [fn(*inputs)], with_grads(fn, inputs, [grad_h]))

    op.variants.append(variant("reference", None, expert_swiglu_reference))
    op.variants += [variant("compiled", mode, compiled(expert_swiglu_reference, mode)) for mode in args.modes]
    op.variants.append(variant("kimitune", None, _ExpertSwiGLU.apply))
    truth_inputs = [t.detach().double().requires_grad_() for t in inputs]
    op.truth = with_grads(expert_swiglu_reference, truth_inputs, [grad_h.double()])()
    return op


def combine_op(args: argparse.Namespace, widths: dict) -> Op:
    tokens, k, C, device = args.tokens, widths["top_k"], widths["hidden"], args.device
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(tokens, widths["experts"], device=device, generator=gen)
    inverse = inverse_permutation(torch.argsort(scores.topk(k, dim=-1).indices.reshape(-1), stable=True))
    rows = torch.randn(tokens * k, C, device=device, generator=gen).to(torch.bfloat16)
    op = Op("combine", {"rows": [tokens * k, C], "y": [tokens, C], "k": k}, ["y"])

    def reference(rows, inverse):
        return sum_token_copies_reference(rows, inverse, k)

    def variant(name, mode, fn):
        return Variant(name, mode, lambda: [fn(rows, inverse)], None)

    op.variants.append(variant("reference", None, reference))
    op.variants += [variant("compiled", mode, compiled(reference, mode)) for mode in args.modes]
    op.variants.append(variant("kimitune", None, lambda rows, inverse: sum_token_copies_triton(rows, inverse, k)))
    op.truth = [reference(rows.double(), inverse)]
    return op


def adapter_shapes() -> list[torch.Size]:
    """The shapes of lora_A, lora_B of each linear that AdapterCasts casts together in the 48B (meta device)."""
    from kimitune.adapters import LoraSettings, apply_lora
    from kimitune.model import KimiLinearConfig, KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(KimiLinearConfig.preset(MODEL))
    apply_lora(model, LoraSettings(r=LORA_R, alpha=2 * LORA_R, target_modules="all-linear", target_experts=False))
    casts = next(m.adapter_casts for m in model.modules() if getattr(m, "adapter_casts", None) is not None)
    return [t.shape for m in casts.modules if m.lora_A.requires_grad for t in (m.lora_A, m.lora_B)]


def casts_op(args: argparse.Namespace, widths: dict) -> Op:
    from kimitune.adapters.casts import CastTogether

    shapes = adapter_shapes()[: args.adapters]
    gen = torch.Generator(device=args.device).manual_seed(0)
    tensors = [torch.randn(s, device=args.device, generator=gen).requires_grad_() for s in shapes]
    grads = [torch.randn(s, device=args.device, generator=gen).to(torch.bfloat16) for s in shapes]
    sizes = [t.numel() for t in tensors]
    op = Op("casts", {"tensors": len(shapes), "elements": sum(sizes), "first": [list(s) for s in shapes[:2]]},
            [f"{len(shapes)} bf16 copies", f"{len(shapes)} float32 gradients"])

    def per_tensor(*ts):
        return tuple(t.to(torch.bfloat16) for t in ts)

    def concatenated(*ts):  # CastTogether's computation in plain torch ops
        buffer = torch.cat([t.reshape(-1) for t in ts]).to(torch.bfloat16)
        return tuple(part.view(t.shape) for part, t in zip(buffer.split(sizes), ts))

    def together(*ts):
        return CastTogether.apply(torch.bfloat16, None, *ts)

    def flat(outputs):  # one tensor for the copies, one for the gradients: errors over all of them
        n = len(tensors)
        return [torch.cat([o.reshape(-1).double() for o in outputs[:n]]),
                torch.cat([o.reshape(-1).double() for o in outputs[n:]])]

    def variant(name, mode, fn):
        return Variant(name, mode, lambda: list(fn(*tensors)), with_grads(fn, tensors, grads))

    op.variants.append(variant("reference", None, per_tensor))
    op.variants += [variant("compiled", mode, compiled(per_tensor, mode)) for mode in args.modes]
    op.variants += [variant("compiled, concatenated", mode, compiled(concatenated, mode)) for mode in args.modes]
    op.variants.append(variant("kimitune", None, together))
    op.collect = flat
    op.truth = flat(with_grads(per_tensor, [t.detach().double().requires_grad_() for t in tensors], grads)())
    return op


BUILDERS = {"swiglu": swiglu_op, "combine": combine_op, "casts": casts_op}


class CompileTimeout(Exception):
    pass


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def first_call(fn: Callable, timeout_s: int, device: str) -> tuple[list[torch.Tensor], float]:
    """(outputs, wall seconds) of the first call, compile included; CompileTimeout past ``timeout_s``."""

    def expire(signum, frame):
        raise CompileTimeout(f"no result within {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(timeout_s)
    try:
        synchronize(device)
        start = time.perf_counter()
        outputs = fn()
        synchronize(device)
        return outputs, time.perf_counter() - start
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def sample_ms(fn: Callable, inner: int, device: str) -> float:
    """Milliseconds per call over ``inner`` calls: CUDA events on the GPU, the wall clock on the CPU (--smoke)."""
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) * 1e3 / inner
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def timed(fn: Callable, args: argparse.Namespace) -> dict:
    """Milliseconds per call: median, quartiles and min over ``args.repeats`` samples of ``args.inner`` calls each,
    after ``args.warmup`` calls."""
    for _ in range(args.warmup):
        fn()
    synchronize(args.device)
    samples = [sample_ms(fn, args.inner, args.device) for _ in range(args.repeats)]
    quartiles = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "p25": quartiles[0], "p75": quartiles[2], "min": min(samples),
            "samples": samples}


def max_abs_errors(got: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    return {name: (g.double() - e.double()).abs().max().item() if g.numel() else 0.0
            for name, g, e in zip(names, got, expected, strict=True)}


def fresh_caches(args: argparse.Namespace, label: str) -> None:
    """Empty on-disk caches for what compiles next (Inductor and Triton read these when they compile)."""
    if args.warm_cache:
        return
    folder = tempfile.mkdtemp(prefix="".join(c if c.isalnum() else "_" for c in label) + "_", dir=args.cache_root)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")


def warm_up_compiler(device: str) -> None:
    """One throw-away compile, forward and backward: Inductor's start-up (imports, worker pool) is not an op's."""
    x = torch.ones(64, device=device, requires_grad=True)
    torch.compile(lambda t: torch.sigmoid(t) * 2, fullgraph=True)(x).sum().backward()
    synchronize(device)
    torch._dynamo.reset()


def run_op(op: Op, args: argparse.Namespace) -> list[dict]:
    rows = []
    expected = None
    for variant in op.variants:
        label = variant.name if variant.mode is None else f"{variant.name} ({variant.mode})"
        row = {"op": op.name, "variant": variant.name, "mode": variant.mode, "label": label, "error": None}
        main = variant.step or variant.forward
        try:
            torch._dynamo.reset()  # each compiled variant compiles from scratch, timed alone
            fresh_caches(args, f"{op.name} {label}")
            outputs, row["compile_s"] = first_call(main, args.compile_timeout, args.device)
            outputs = op.collect(outputs)
            if variant.name == "reference":  # the first variant: what the others are checked against
                expected = outputs
            if expected is None:
                raise RuntimeError("the eager reference failed, so nothing to check this variant against")
            row["max_abs_error"] = max_abs_errors(outputs, expected, op.outputs)
            row["max_abs_error_vs_float64"] = max_abs_errors(outputs, op.truth, op.outputs)
            row["forward_ms"] = timed(variant.forward, args)
            if variant.step is not None:
                row["forward_backward_ms"] = timed(variant.step, args)
        except Exception as error:  # a variant that does not compile or run is reported, the others still run
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc(limit=3)
        print_row(row)
        rows.append(row)
    return rows


def ms(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['median']:.3f} ({stats['p25']:.3f}-{stats['p75']:.3f})"


def print_header() -> None:
    print("| op | variant | compile s | max abs err vs reference / vs float64 | forward ms (quartiles) | "
          "forward + backward ms (quartiles) |")
    print("|---|---|---|---|---|---|")


def print_row(row: dict) -> None:
    if row["error"]:
        print(f"| {row['op']} | {row['label']} | - | {row['error'][:200]} | - | - |", flush=True)
        return
    err = max(row["max_abs_error"].values())
    err64 = max(row["max_abs_error_vs_float64"].values())
    print(f"| {row['op']} | {row['label']} | {row['compile_s']:.1f} | {err:.3g} / {err64:.3g} | "
          f"{ms(row.get('forward_ms'))} | {ms(row.get('forward_backward_ms'))} |", flush=True)


def verdict(rows: list[dict]) -> dict | None:
    """The hand-written kernel against the fastest compiled variant, on forward + backward where there is one."""
    ok = [r for r in rows if not r["error"]]
    key = "forward_backward_ms" if any("forward_backward_ms" in r for r in ok) else "forward_ms"
    kernel = next((r for r in ok if r["variant"] == "kimitune"), None)
    compiled_rows = [r for r in ok if r["mode"] is not None]
    if kernel is None or not compiled_rows:
        return None
    best = min(compiled_rows, key=lambda r: r[key]["median"])
    k, c = kernel[key], best[key]
    return {"op": rows[0]["op"], "timing": key, "kimitune_ms": k["median"], "best_compiled": best["label"],
            "best_compiled_ms": c["median"], "speedup": c["median"] / k["median"],
            "kimitune_faster_beyond_noise": k["p75"] < c["p25"], "compiled_faster_beyond_noise": c["p75"] < k["p25"]}


def print_verdict(v: dict) -> None:
    if v["kimitune_faster_beyond_noise"]:
        call = "keep the kernel: faster beyond the noise"
    elif v["compiled_faster_beyond_noise"]:
        call = "compile is faster beyond the noise"
    else:
        call = "within the noise"
    print(f"{v['op']}: kimitune {v['kimitune_ms']:.3f} ms, {v['best_compiled']} {v['best_compiled_ms']:.3f} ms "
          f"({v['timing']}): {v['speedup']:.2f}x, {call}")


def write(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="torch.compile modes, comma-separated")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--repeats", type=int, default=15, help="timed samples; the median is reported")
    parser.add_argument("--compile-timeout", type=int, default=300,
                        help="seconds for a variant's first call (its compile); past it the row says so")
    parser.add_argument("--warm-cache", action="store_true", help="keep Inductor's and Triton's on-disk caches")
    parser.add_argument("--adapters", type=int, default=None, help="casts: only the first N tensors (all by default)")
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU, a few tokens (no timing)")
    parser.add_argument("--out", help="JSON results to this path")
    args = parser.parse_args(argv)
    ops = [name for name in args.ops.split(",") if name]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {OPS}")
    args.modes = [mode for mode in args.modes.split(",") if mode]
    args.device = "cuda"
    if args.smoke:
        args.device, args.tokens, args.warmup, args.inner, args.repeats = "cpu", 4, 1, 1, 2
        args.adapters = args.adapters or 4
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: kernels on CPU tensors
    elif not torch.cuda.is_available():
        reason = "no CUDA device: compile_ab.py times GPU kernels and skips here (--smoke checks it on the CPU)"
        print(f"skipped: {reason}")
        write(args.out, {"skipped": reason, "torch": torch.__version__})
        return 0

    args.cache_root = None if args.warm_cache else tempfile.mkdtemp(prefix="compile_ab_")
    fresh_caches(args, "warm-up")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (--smoke: not a measurement)"
    print(f"{device}, torch {torch.__version__}, triton {triton_version}, {args.tokens} tokens, "
          f"{args.warmup} warm-up + {args.repeats} x {args.inner} calls per variant")
    widths = model_widths()
    result = {"device": device, "torch": torch.__version__, "triton": triton_version, "tokens": args.tokens,
              "widths": widths, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "ops": {},
              "results": [], "verdicts": []}
    if args.modes:
        try:
            warm_up_compiler(args.device)
        except Exception as error:  # the compiled rows will say why
            print(f"torch.compile's warm-up failed: {type(error).__name__}: {error}")
    print_header()
    for name in ops:
        try:
            op = BUILDERS[name](args, widths)
        except Exception as error:
            print(f"| {name} | - | - | could not build the inputs: {type(error).__name__}: {error} | - | - |")
            result["ops"][name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        result["ops"][name] = {"shapes": op.shapes, "outputs": op.outputs}
        rows = run_op(op, args)
        result["results"] += rows
        v = verdict(rows)
        if v is not None:
            result["verdicts"].append(v)
        del op
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print()
    for v in result["verdicts"]:
        print_verdict(v)
    write(args.out, result)
    if args.cache_root:
        shutil.rmtree(args.cache_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
