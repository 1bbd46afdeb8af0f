"""CE-LoRA against kimitune's own LoRA: step time on the GPU, one layer's backward, quality on the CPU.

    python benchmarks/ce_lora.py speed                  # H100: 48B widths, 4 layers, bf16, seq 4096
    python benchmarks/ce_lora.py speed --tiny           # the same code on the tiny preset, on the CPU (a check)
    python benchmarks/ce_lora.py layer                  # one frozen product's dX: exact against CE-LoRA
    python benchmarks/ce_lora.py quality                # CPU: eval loss and exact match after the same steps
    (--sparsity 0.5,0.75 runs CE-LoRA at each sparsity; --double-rank, --refresh-steps, --adaptive as the YAML keys)

speed: the model of issue 7 (Kimi-Linear-48B-A3B's widths: hidden 2304, 32 KDA heads of 128, 256 experts top-8 of
1024, vocab 163840; 4 layers KDA, KDA, KDA, MLA, layer 1 dense; random bf16 weights), one sequence of ``--seq``
random tokens, r=16 alpha=32 on all linear layers, and again with the experts adapted too. For LoRA and CE-LoRA
(same weights, same adapters, same tokens) it times the forward, the backward, the optimizer step and the whole
step (CUDA events, median of ``--steps`` steps after ``--warmup``), the one step that refreshes CE-LoRA's kept
rows (once every ``ce_lora_refresh_steps`` backward passes), and the peak memory.

layer: the backward of one frozen product alone (dX only, as in LoRA), exact against CE-LoRA in its steady state: a
2304 -> 4096 projection over ``--seq`` tokens and an [E, 2048, 2304] expert stack over ``8 * seq`` rows.

quality: the tiny preset is first fully fine-tuned (``--pretrain-on user``: on the user turns of the quickstart
data, i.e. vocabulary and format but not the answers; ``task``: on the replies themselves, briefly) and saved; LoRA
and CE-LoRA then train on the assistant replies from it with the same data, seed and number of steps
(``kimitune.train.Trainer``), and ``kimitune.infer.evaluate`` reports eval loss and exact match (greedy replies)
on the quickstart eval split.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from kimitune.adapters import LoraSettings, apply_lora, load_adapter
from kimitune.adapters.ce_lora import CeLoraSettings, apply_ce_lora, approximated_modules
from kimitune.model import KimiLinearConfig, KimiLinearForCausalLM, RunOptions

ROOT = Path(__file__).resolve().parents[1]
LORA_R, LORA_ALPHA = 16, 32


# ----- speed ---------------------------------------------------------------------------------------------------


def model_config(layers: int, preset: str) -> KimiLinearConfig:
    """``preset``'s widths with ``layers`` layers in the release's pattern (every 4th MLA, the first dense)."""
    base = KimiLinearConfig.preset(preset)
    kda = [i for i in range(1, layers + 1) if i % 4 != 0]
    return replace(base, num_hidden_layers=layers, kda_layers=kda,
                   full_attn_layers=[i for i in range(1, layers + 1) if i not in kda])


class Timer:
    """Marks on the device's stream (CUDA events) or on the host clock (CPU); ``ms(a, b)`` after ``wait()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a: int, b: int) -> float:
        if self.cuda:
            return self.marks[a].elapsed_time(self.marks[b])
        return 1000 * (self.marks[b] - self.marks[a])


def build(cfg: KimiLinearConfig, state: dict, device: torch.device, sparsity: float | None, experts: bool, args):
    """The model with LoRA (``sparsity`` None) or CE-LoRA at ``sparsity``; the same adapters either way."""
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    settings = LoraSettings(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear", target_experts=experts)
    torch.manual_seed(1)
    if sparsity is None:
        apply_lora(model, settings)
    else:
        ce = CeLoraSettings(sparsity=sparsity, double_rank=args.double_rank, refresh_steps=args.refresh_steps,
                            adaptive=args.adaptive)
        apply_ce_lora(model, settings, ce)
    return model.train()


def timed_step(model, optimizer, ids, device, recompute: bool) -> dict[str, float]:
    """One step timed phase by phase (forward, backward, optimizer), which kimitune's TrainStep runs as one call:
    CE-LoRA changes the backward alone, and this shows where the time goes."""
    timer = Timer(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    options = RunOptions(recompute_layers=model.recomputed_layers() if recompute else frozenset())
    timer.mark()
    with autocast:
        loss = model(ids, labels=ids, return_logits=False, options=options).loss
    timer.mark()
    loss.backward()
    timer.mark()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.mark()
    timer.wait()
    return {"forward_ms": timer.ms(0, 1), "backward_ms": timer.ms(1, 2), "optimizer_ms": timer.ms(2, 3),
            "step_ms": timer.ms(0, 3), "loss": loss.item()}


def measure(cfg, state, device, sparsity: float | None, experts: bool, args) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build(cfg, state, device, sparsity, experts, args)
    setup_s = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(2)).to(device)
    every = [timed_step(model, optimizer, ids, device, args.ckpt) for _ in range(args.warmup + args.steps)]
    steps = every[args.warmup:]
    result = {key: statistics.median(s[key] for s in steps) for key in ("forward_ms", "backward_ms", "optimizer_ms",
                                                                        "step_ms")}
    approximated = approximated_modules(model)
    if approximated:
        for approx in approximated.values():
            approx.backward_passes = 0  # the next backward refreshes every selection
        refresh = timed_step(model, optimizer, ids, device, args.ckpt)
        result["refresh_step_ms"] = refresh["step_ms"]
        result["approximated"] = len(approximated)
        # The share of the approximated weights' rows the reduced products still read, by weight size.
        result["kept_fraction"] = (sum(a.kept_rows * a.in_features * a.groups for a in approximated.values())
                                   / sum(a.out_features * a.in_features * a.groups for a in approximated.values()))
    result.update(adapter=adapter_name(sparsity), experts=experts, seq=args.seq, ckpt=args.ckpt, setup_s=setup_s,
                  first_loss=every[0]["loss"], trainable=sum(p.numel() for p in params),
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))
    del model, optimizer, params
    gc.collect()
    return result


def adapter_name(sparsity: float | None) -> str:
    return "lora" if sparsity is None else f"ce_lora {sparsity:g}"


def speed(args) -> None:
    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = model_config(args.layers, "tiny" if args.tiny else "kimi-linear-48b-a3b")
    torch.manual_seed(0)
    with torch.device(device):
        model = KimiLinearForCausalLM(cfg).to(torch.float32 if args.tiny else torch.bfloat16)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{name}: {args.layers} layers, {sum(v.numel() for v in state.values()) / 1e9:.2f}B parameters, "
          f"seq {args.seq}, checkpointing {'on' if args.ckpt else 'off'}, CE-LoRA sparsity {args.sparsity}, "
          f"double rank {args.double_rank}, adaptive {args.adaptive}")
    results = []
    for experts in (False, True):
        for sparsity in [None, *args.sparsity]:
            result = measure(cfg, state, device, sparsity, experts, args)
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\n| targets | adapter | forward ms | backward ms | optimizer ms | step ms | step time saved | tokens/s gain "
          "| refresh step ms | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lora = next(x for x in results if x["adapter"] == "lora" and x["experts"] == r["experts"])
        saved = f"{100 * (1 - r['step_ms'] / lora['step_ms']):.1f}%" if r is not lora else ""
        gain = f"{100 * (lora['step_ms'] / r['step_ms'] - 1):.1f}%" if r is not lora else ""
        print(f"| {'all-linear + experts' if r['experts'] else 'all-linear'} | {r['adapter']} | "
              f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{saved} | {gain} | {r.get('refresh_step_ms', float('nan')):.1f} | {r['peak_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


# ----- one layer -------------------------------------------------------------------------------------------------


def backward_ms(forward, x: torch.Tensor, grad: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median time of ``forward(x).backward(grad)``'s backward alone, after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        x.grad = None
        y = forward(x)
        timer = Timer(device)
        timer.mark()
        y.backward(grad)
        timer.mark()
        timer.wait()
        if i >= 2:
            times.append(timer.ms(0, 1))
    return statistics.median(times)


def layer(args) -> None:
    """dX of one frozen product, exact against CE-LoRA's (steady state, no refresh): a KDA projection at 48B widths
    (2304 -> 4096) and one stack of experts' gate_up_proj ([E, 2048, 2304], ``seq * 8`` rows over E experts)."""
    from kimitune.adapters.ce_amm import ApproxGroupedLinearFunction, ApproxLinearFunction, RowSampledInputGrad
    from kimitune.ops.grouped_mm import grouped_linear

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = {"linear": args.seq, "experts": args.seq * 8}
    weights = {"linear": torch.randn(4096, 2304, generator=gen) / 48,
               "experts": torch.randn(args.experts, 2048, 2304, generator=gen) / 48}
    counts = torch.bincount(torch.randint(0, args.experts, (rows["experts"],), generator=gen), minlength=args.experts)
    offsets = counts.cumsum(0).to(torch.int32).to(device)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}: backward of dX only, "
          f"{args.seq} tokens, {args.experts} experts ({rows['experts'] // args.experts} rows each on average)")
    print("| product | exact ms | " + " | ".join(f"CE-LoRA {s:g} ms" for s in args.sparsity) + " |")
    print("|---|---|" + "---|" * len(args.sparsity))
    for kind in ("linear", "experts"):
        weight = weights[kind].to(device, dtype)
        x = torch.randn(rows[kind], weight.shape[-1], generator=gen).to(device, dtype).requires_grad_(True)
        grad = torch.randn(rows[kind], weight.shape[-2], generator=gen).to(device, dtype)
        if kind == "linear":
            exact = backward_ms(lambda t: torch.nn.functional.linear(t, weight), x, grad, device, args.repeats)
        else:
            exact = backward_ms(lambda t: grouped_linear(t, weight, offsets), x, grad, device, args.repeats)
        cells = []
        for sparsity in args.sparsity:
            approx = RowSampledInputGrad(weight, sparsity, args.double_rank if args.double_rank is not None else 14,
                                         refresh_steps=10**9, adaptive=args.adaptive)
            if kind == "linear":
                ms = backward_ms(lambda t: ApproxLinearFunction.apply(t, weight, None, approx), x, grad, device,
                                 args.repeats)
            else:
                ms = backward_ms(lambda t: ApproxGroupedLinearFunction.apply(t, weight, offsets, approx), x, grad,
                                 device, args.repeats)
            cells.append(f"{ms:.2f} ({100 * (1 - ms / exact):.0f}% less)")
        print(f"| {kind} {tuple(weight.shape)} | {exact:.2f} | " + " | ".join(cells) + " |", flush=True)


# ----- quality -------------------------------------------------------------------------------------------------


def quality(args) -> None:
    from rich.console import Console

    from kimitune.config import parse_config
    from kimitune.data import load_tokenizer, prepare_datasets
    from kimitune.infer.evaluate import evaluate
    from kimitune.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    work, examples = Path(args.work_dir), Path(args.examples)
    common = {
        "tokenizer": str(examples / "tokenizer"),
        "datasets": [{"path": str(examples / "data/quickstart_train.jsonl"), "type": "chat_template"}],
        "test_datasets": [{"path": str(examples / "data/quickstart_eval.jsonl"), "type": "chat_template"}],
        "sequence_len": 256, "sample_packing": True, "micro_batch_size": 8, "seed": args.seed, "warmup_steps": 5,
        "dataset_prepared_path": str(work / "cache"),
    }

    def train(name: str, **keys) -> dict:
        # A benchmark run starts afresh each time: an earlier run of the same name is replaced.
        config, _ = parse_config(common | {"output_dir": str(work / name), "overwrite_output_dir": True} | keys)
        summary = Trainer(config, Console(quiet=True)).train()
        return {"config": config, "seconds": summary.seconds, "steps": summary.steps}

    roles = ["user"] if args.pretrain_on == "user" else ["assistant"]
    base = train("base", init_from_config=str(examples / "models/tiny.json"), roles_to_train=roles,
                 max_steps=args.pretrain_steps, learning_rate=3e-3,
                 dataset_prepared_path=str(work / f"{args.pretrain_on}_cache"))
    print(f"base: {args.pretrain_steps} full fine-tuning steps on the {roles[0]} turns, {base['seconds']:.0f} s",
          flush=True)
    adapter_keys = {"base_model": str(work / "base"), "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                    "lora_target_linear": True, "lora_target_experts": True, "max_steps": args.train_steps,
                    "learning_rate": args.lr}
    rows = []
    tokenizer = load_tokenizer(str(examples / "tokenizer"))
    for sparsity in [None, *args.sparsity]:
        name = adapter_name(sparsity)
        keys = dict(adapter_keys, adapter="lora" if sparsity is None else "ce_lora")
        if sparsity is not None:
            keys.update(ce_lora_sparsity=sparsity, ce_lora_adaptive=args.adaptive,
                        ce_lora_refresh_steps=args.refresh_steps)
            if args.double_rank is not None:
                keys["ce_lora_double_rank"] = args.double_rank
        run = train(name.replace(" ", "_"), **keys)
        model = KimiLinearForCausalLM.from_pretrained(work / "base")
        load_adapter(model, work / name.replace(" ", "_"))  # the saved adapter is plain LoRA, whichever trained it
        model.eval()
        samples = prepare_datasets(run["config"], tokenizer).eval
        report = evaluate(model, tokenizer, run["config"], samples[: args.eval_samples])
        rows.append({"adapter": name, "steps": run["steps"], "train_s": run["seconds"], "eval_loss": report.loss,
                     "exact_match": report.exact_match, "replies": report.replies, "samples": report.samples})
        print(json.dumps(rows[-1]), flush=True)
    lora = rows[0]
    print("\n| adapter | steps | eval loss | vs LoRA | exact match | train s (CPU, provisional) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{100 * (r['eval_loss'] / lora['eval_loss'] - 1):+.2f}%" if r is not lora else ""
        print(f"| {r['adapter']} | {r['steps']} | {r['eval_loss']:.4f} | {rel} | {100 * r['exact_match']:.1f}% "
              f"({r['replies']} replies) | {r['train_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["speed", "layer", "quality"])
    parser.add_argument("--sparsity", type=lambda text: [float(v) for v in text.split(",")], default=[0.5],
                        help="ce_lora_sparsity; a comma-separated list runs CE-LoRA at each (LoRA once)")
    parser.add_argument("--double-rank", type=int, default=None, help="ce_lora_double_rank (default 7/8 r)")
    parser.add_argument("--refresh-steps", type=int, default=200, help="ce_lora_refresh_steps")
    parser.add_argument("--adaptive", action="store_true", help="ce_lora_adaptive")
    parser.add_argument("--json", default=None, help="also write the rows here")
    speed_args = parser.add_argument_group("speed")
    speed_args.add_argument("--tiny", action="store_true", help="tiny preset on the CPU: checks the script only")
    speed_args.add_argument("--layers", type=int, default=4)
    speed_args.add_argument("--seq", type=int, default=4096)
    speed_args.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    speed_args.add_argument("--warmup", type=int, default=3)
    speed_args.add_argument("--steps", type=int, default=10)
    layer_args = parser.add_argument_group("layer")
    layer_args.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    layer_args.add_argument("--experts", type=int, default=256)
    layer_args.add_argument("--repeats", type=int, default=10)
    quality_args = parser.add_argument_group("quality")
    quality_args.add_argument("--pretrain-steps", type=int, default=40)
    quality_args.add_argument("--pretrain-on", choices=["user", "task"], default="user",
                              help="the base's full fine-tuning: the user turns only, or the task itself (replies)")
    quality_args.add_argument("--train-steps", dest="train_steps", type=int, default=60)
    quality_args.add_argument("--lr", type=float, default=1e-2)
    quality_args.add_argument("--eval-samples", type=int, default=200)
    quality_args.add_argument("--seed", type=int, default=42, help="the runs' seed (base, data order, adapters)")
    quality_args.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a busy host)")
    quality_args.add_argument("--work-dir", default="outputs/ce_lora_bench")
    quality_args.add_argument("--examples", default=str(ROOT / "examples"),
                              help="folder with data/quickstart_*.jsonl, tokenizer/ and models/tiny.json")
    args = parser.parse_args()
    {"speed": speed, "layer": layer, "quality": quality}[args.part](args)


if __name__ == "__main__":
    main()
