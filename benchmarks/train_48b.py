"""The whole Kimi-Linear-48B-A3B trained with LoRA on one GPU, its frozen weights in 8-bit or 4-bit (QLoRA).

The model (27 layers, 256 experts top-8 of 1024, hidden 2304, vocab 163840; examples/models/kimi-linear-48b-a3b.json)
is built with random weights straight into quantised form, one decoder layer at a time on the GPU
(``kimitune.quant.init_quantized``: materialise a layer in bf16, initialise, quantise, next), so the GPU never
holds more than one layer in bf16. LoRA r=16, alpha=32 on every linear (``--experts`` adds the stacked experts),
gradient checkpointing per decoder layer, bf16 compute, AdamW (fused) on the LoRA parameters, the loss without
logits, each step kimitune's own (``kimitune.train.step.TrainStep``: clipping at 1.0, the device-side non-finite skip).
Each row runs ``--warmup`` + ``--steps`` steps on one sequence of random tokens and prints tokens/s, model
FLOPs utilisation (counted as in train_gpu.py, whose helpers it uses), peak GPU memory (max allocated and
reserved) and the build time. ``--cap-gib X`` limits the process to X GiB of the GPU
(``torch.cuda.set_per_process_memory_fraction``), so that an H200 answers whether a row fits a smaller card.

    python benchmarks/train_48b.py --bits 8 --seq 8192                  # target: peak <= 70 GiB
    python benchmarks/train_48b.py --bits 4 --seq 8192,32768            # target: 32768 tokens fit in 80 GB
    python benchmarks/train_48b.py --bits 8 --seq 8192 --experts        # LoRA on the experts too
    python benchmarks/train_48b.py --bits 16 --seq 8192 --ckpt-layers 0 --kda-keep  # H200: the 3x row, fastest
    python benchmarks/train_48b.py --bits 8 --fp8 --seq 8192 --ckpt-layers 0,27     # float8 e4m3 frozen weights
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/train_48b.py --bits 8 --fp8 --seq 8192 \
        --cap-gib 80 --ckpt-layers 0,14                                 # issue 24: within an 80 GiB card
    python benchmarks/train_48b.py --estimate                           # the paper estimate below, no GPU
    python benchmarks/train_48b.py --smoke                              # tiny depth/width on the CPU: checks the script

Paper estimate of the peak (GiB = 2^30 bytes; ``--estimate`` prints it from the config):

| | 8-bit, 8192 | 4-bit NF4, 8192 | 4-bit NF4, 32768 | 8-bit, 8192, +experts |
|---|---|---|---|---|
| quantised weights (48.35 B params: 1 B + 4 B / row; 4-bit: 0.5 B + 4 B / 64) | 45.1 | 25.3 | 25.3 | 45.1 |
| kept in bf16 (embeddings, lm_head, norms, router, conv, A_log, dt_bias: 0.77 B) | 1.4 | 1.4 | 1.4 | 1.4 |
| LoRA fp32 params + grads + 2 AdamW states (20.9 M; +experts 839 M), 16 B each | 0.3 | 0.3 | 0.3 | 12.5 |
| checkpointed layer inputs, 27 x T x 2304 x 2 B | 0.9 | 0.9 | 3.8 | 0.9 |
| one layer recomputed in backward (saved activations of its forward) | 1.5 | 1.5 | 6.1 | 2.3 |
| loss (chunked / cut-cross-entropy), hidden and its grad | 0.3 | 0.3 | 0.7 | 0.3 |
| **peak allocated (estimate)** | **~52.7** | **~32.9** | **~43.1** | **~66.2** |

With double quantisation (``--double-quant``) the 4-bit weights take 23.2 GiB instead of 25.3. So: 8-bit at 8192
tokens is estimated ~17 GiB under the 70 GiB target (even with LoRA on the experts, ~66 GiB), and 4-bit at 32768
tokens ~43 GiB, well inside 80 GB; the estimate leaves out allocator slack and fla-core's kernel workspaces (a few
GiB at most).

Design choices that keep it there: the dequantised expert stack (3.4 GiB per layer in bf16 for both projections)
exists only while its own grouped matmul runs: gate_up (2.25 GiB) then down (1.1 GiB), in the forward, in the
checkpointed recomputation and in the backward alike; no autograd node saves it (``kimitune.quant.matmul``), so
checkpointing keeps no extra copy. The quantised linears save neither the weight nor their input (no dW). The
build never holds two layers in bf16 (peak while building: the quantised layers so far + 3.4 GiB). Reserved memory
runs above allocated by the caching allocator's slack (the stack-sized blocks are reused layer after layer);
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` keeps that slack small.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace

import torch

from kimitune.adapters import LoraSettings, apply_lora
from kimitune.data.packing import Batch
from kimitune.model import KimiLinearConfig, KimiLinearForCausalLM, RunOptions
from kimitune.quant import QuantSpec, init_quantized, weight_bytes
from kimitune.train.step import TrainStep
from kimitune.train.trainer import frozen_startup_objects
from train_gpu import PEAK_FLOPS, active_linear_params, flops_per_token, print_profile  # benchmarks/train_gpu.py

LORA_R, LORA_ALPHA = 16, 32
GiB = 2**30


def smoke_config() -> KimiLinearConfig:
    """The 48B's structure at a width and depth the CPU runs in seconds: KDA x3 + MLA, layer 1 dense."""
    return replace(
        KimiLinearConfig.preset("kimi-linear-48b-a3b"), num_hidden_layers=4, kda_layers=[1, 2, 3],
        full_attn_layers=[4], hidden_size=256, intermediate_size=512, kda_num_heads=4, kda_head_dim=64,
        num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        num_experts=16, moe_intermediate_size=128, vocab_size=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def estimate(cfg: KimiLinearConfig, spec: QuantSpec, seq: int, experts: bool) -> dict[str, float]:
    """The peak-memory estimate of the docstring's table (GiB), from the config. Activations are bf16 (2 B) unless
    said; ``8T`` token copies go through the experts (top-8)."""
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    quantised = kept = 0.0
    for name, p in model.named_parameters():
        is_stack = p.ndim == 3
        is_linear = p.ndim == 2 and (name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"))
        if is_stack or (is_linear and not name.startswith("lm_head")):
            n = p.numel()
            if spec.bits == 8:
                quantised += n + 4 * n / p.shape[-1]
            else:
                quantised += n / 2 + (n / 64 + 4 * n / 64 / 256 if spec.double_quant else 4 * n / 64)
        else:
            kept += 2 * p.numel()
    apply_lora(model, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear", target_experts=experts))
    lora = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    C, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    k, L = cfg.num_experts_per_token, cfg.num_hidden_layers
    kda = cfg.kda_num_heads * cfg.kda_head_dim
    copies = k * seq
    # MoE: gate_up output (kept by silu / chunk), silu output, per-copy outputs (kept by the weighted bmm);
    # KDA: fp32 copies of the input for six LoRA'd projections, o_proj's fp32 input, q/k/v, fp32 decay g.
    moe_saved = copies * (2 * I + I + C) * 2 + (copies * (C + I) * 4 if experts else 0)
    attn_saved = seq * (6 * C * 4 + kda * 4 + 3 * kda * 2 + kda * 4)
    stack = E * 2 * I * C * 2 if spec.bits == 4 else 0  # 8-bit stacks multiply from 8 bits (ops/quant_grouped_mm.py)
    backward = stack + copies * (2 * I + C + C) * 2 + (copies * C * 4 if experts else 0)
    parts = {
        "quantised weights": quantised,
        "kept in bf16": kept,
        "LoRA + grads + AdamW": lora,
        "checkpointed layer inputs": L * seq * C * 2,
        "one layer recomputed": moe_saved + attn_saved,
        "backward transients (4-bit: one stack)": backward,
        "loss, hidden + grad": 128 * 2**20 + 2 * seq * C * 4,
    }
    parts = {key: value / GiB for key, value in parts.items()}
    parts["peak allocated (estimate)"] = sum(parts.values())
    return parts


def build(cfg: KimiLinearConfig, spec: QuantSpec | None, device: str, dtype: torch.dtype, experts: bool,
          lora: bool = True):
    """The quantised model (``spec`` None: all in ``dtype``, initialised on ``device`` in that dtype) with LoRA
    (``lora`` False: without, e.g. for its weights to go to the peer); returns (model, build seconds)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    if spec is None:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise in bf16 directly: float32 first would need twice the memory
        try:
            with torch.device(device):
                model = KimiLinearForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
    else:
        model = init_quantized(cfg, spec, device=device, dtype=dtype)
    if lora:
        apply_lora(model, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear",
                                       target_experts=experts))
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - start


def cap_memory(cap_gib: float | None) -> float | None:
    """Limits the memory this process's caching allocator reserves on the GPU to ``cap_gib`` GiB (None: no limit),
    before anything is allocated; returns the cap in force. Past it an allocation raises OutOfMemoryError, which a
    row reports as OOM, as on a card of that size. A cap above the card's memory leaves the card as the limit (an
    H100's 79.1 GiB under ``--cap-gib 80``), and says so."""
    if cap_gib is None:
        return None
    if cap_gib <= 0:
        raise SystemExit(f"--cap-gib {cap_gib:g}: a cap must be above 0 GiB")
    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gib * GiB >= total:
        print(f"--cap-gib {cap_gib:g}: the GPU has {total / GiB:.1f} GiB, which is the cap", flush=True)
        return total / GiB
    torch.cuda.set_per_process_memory_fraction(cap_gib * GiB / total)
    return cap_gib


def run_seq(model, cfg, seq: int, warmup: int, steps: int, device: str, options: RunOptions,
            profile: bool = False, offload: bool = False, progress: bool = False) -> dict:
    """One length's row: tokens/s over ``steps`` after ``warmup``, losses, peaks, MFU (or ``oom``). ``progress``:
    a line after every step (its loss, the seconds so far, the peak so far; the loss read waits for the step), so
    that a run stopped during a long length still tells how far it got."""
    cuda = device == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    train_step = TrainStep(model, optimizer, device, options=options, max_grad_norm=1.0, offload_activations=offload)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    batch = Batch(input_ids=ids, labels=ids, cu_seqlens=None, num_tokens=seq, num_label_tokens=seq - 1)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, begun = [], time.perf_counter()
    try:
        with frozen_startup_objects():  # as kimitune's trainer runs its steps
            for i in range(warmup + steps):
                if i == warmup:
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                losses.append(train_step([batch], batch.num_label_tokens).loss)
                if progress:
                    peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
                    print(f"  {seq} tokens, step {i + 1}/{warmup + steps}: loss {losses[-1].item():.4f}, "
                          f"{time.perf_counter() - begun:.0f} s so far, peak {peak:.1f} GiB", flush=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        result = {"tokens_per_s": seq / seconds, "step_s": seconds, "losses": [round(x.item(), 4) for x in losses]}
        if profile:
            print_profile(lambda: train_step([batch], batch.num_label_tokens),
                          f"{seq} tokens, {len(options.recompute_layers)} layers recomputed")
    except torch.cuda.OutOfMemoryError:
        result = {"oom": True}
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        name = torch.cuda.get_device_name()
        peak_flops = next((v for key, v in PEAK_FLOPS.items() if key in name), 989e12)
        if "tokens_per_s" in result:
            lora_params = sum(p.numel() for p in params)
            result["mfu"] = flops_per_token(cfg, seq, lora_params) * result["tokens_per_s"] / peak_flops
    del train_step, optimizer, params
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, choices=(16, 8, 4), default=8,
                        help="frozen weights in 8-bit, 4-bit or (16) plain bf16, e.g. the 3x row against the peer")
    parser.add_argument("--fp8", action="store_true", help="with --bits 8: float8 e4m3 weights (load_in_fp8), "
                        "not int8")
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--seq", default="8192", help="comma-separated sequence lengths, one row each")
    parser.add_argument("--experts", action="store_true", help="LoRA on the stacked experts too")
    parser.add_argument("--ckpt-layers", default=None,
                        help="comma-separated: how many decoder layers recompute in the backward, one row each "
                             "(default: all; 0: none)")
    parser.add_argument("--kda-keep", action="store_true",
                        help="fla's KDA keeps its intermediates for the backward (kda_keep_intermediates: true)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--estimate", action="store_true", help="print the paper estimate and stop")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="let this process reserve at most this many GiB of the GPU, as if the card had that "
                             "much (an H100 80 GB has 79.6 GiB, ~79 of them for tensors beside the CUDA context)")
    parser.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of one step per row")
    parser.add_argument("--smoke", action="store_true", help="tiny depth/width on the CPU: checks the script only")
    args = parser.parse_args()

    if args.fp8 and args.bits != 8:
        parser.error("--fp8 needs --bits 8")
    spec = None if args.bits == 16 else QuantSpec(args.bits, args.quant_type, args.double_quant, float8=args.fp8)
    cfg = smoke_config() if args.smoke else KimiLinearConfig.preset("kimi-linear-48b-a3b")
    seqs = [int(s) for s in args.seq.split(",")]
    if args.smoke:
        seqs = [min(s, 256) for s in seqs]
    for seq in seqs if spec is not None else []:
        parts = estimate(cfg, spec, seq, args.experts)
        print(f"estimate, {args.bits}-bit, {seq} tokens{', +experts' if args.experts else ''}: "
              + "; ".join(f"{key} {value:.2f}" for key, value in parts.items()))
    if args.estimate:
        return

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cap_gib = cap_memory(args.cap_gib) if device == "cuda" else None
    if args.cap_gib is not None and device != "cuda":
        print(f"--cap-gib {args.cap_gib:g}: ignored on the CPU (--smoke)")
    model, build_s = build(cfg, spec, device, dtype, args.experts)
    weights_gib = weight_bytes(model) / GiB
    built_peak = torch.cuda.max_memory_allocated() / GiB if device == "cuda" else float("nan")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    capped = "" if cap_gib is None else f"memory capped at {cap_gib:g} GiB; "
    print(f"{gpu}: built {sum(1 for _ in model.model.layers)} layers in {build_s:.1f} s; weights + LoRA "
          f"{weights_gib:.2f} GiB; peak while building {built_peak:.2f} GiB; "
          f"{capped}{active_linear_params(cfg) / 1e9:.2f}B active linear weights per token", flush=True)
    rows = []
    counts = [int(c) for c in args.ckpt_layers.split(",")] if args.ckpt_layers else [cfg.num_hidden_layers]
    for seq, count in [(seq, count) for seq in seqs for count in counts]:
        options = RunOptions(recompute_layers=model.recomputed_layers(count) if count else frozenset(),  # 0: none
                             kda_keep_intermediates=args.kda_keep)
        result = run_seq(model, cfg, seq, args.warmup, args.steps, device, options, args.profile and device == "cuda")
        quant_type = {16: "bf16", 8: "fp8" if args.fp8 else "int8", 4: spec and spec.quant_type}[args.bits]
        planned = estimate(cfg, spec, seq, args.experts)["peak allocated (estimate)"] if spec else float("nan")
        result.update(bits=args.bits, quant_type=quant_type, seq=seq, experts=args.experts, build_s=build_s,
                      ckpt_layers=count, kda_keep=args.kda_keep, weights_gib=weights_gib, estimate_gib=planned,
                      cap_gib=cap_gib)
        rows.append(result)
        print(json.dumps(result), flush=True)
    print("\n| bits | seq | recomputed layers | KDA intermediates | experts LoRA | tokens/s | MFU | "
          "peak allocated GiB | peak reserved GiB | estimate GiB | cap GiB | build s |\n" + "|---" * 12 + "|")
    for r in rows:
        speed = "OOM" if r.get("oom") else f"{r['tokens_per_s']:.0f}"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        cap = "-" if r["cap_gib"] is None else f"{r['cap_gib']:g}"
        print(f"| {r['quant_type']} | {r['seq']} | {r['ckpt_layers']} | {'kept' if r['kda_keep'] else 'recomputed'} | "
              f"{'yes' if r['experts'] else 'no'} | {speed} | "
              f"{mfu} | "
              f"{r.get('peak_allocated_gib', float('nan')):.1f} | {r.get('peak_reserved_gib', float('nan')):.1f} | "
              f"{r['estimate_gib']:.1f} | {cap} | {r['build_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
