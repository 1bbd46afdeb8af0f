"""LoRA training speed and memory on one GPU: kimitune against transformers + PEFT, same weights, same run.

The model is Kimi-Linear-48B-A3B's widths (hidden 2304, 32 KDA heads of 128, 256 experts top-8 of 1024, vocab
163840) with ``--layers`` layers in the release's pattern (4: KDA, KDA, KDA, MLA; layer 1 dense), random bf16
weights. Each row trains LoRA (r=16, alpha=32, all-linear; ``+experts`` also adapts the stacked experts, kimitune
only; ``+fp8`` / ``+int8`` first quantise the frozen weights to float8 e4m3 / int8, one scale per row, issue 24) with
AdamW on one sequence of random tokens, and reports tokens/s, model FLOPs utilisation and peak memory.

The peer is transformers' own ``KimiLinearForCausalLM`` (fla-core's kernels when installed, experts through
``grouped_mm``) with PEFT's LoRA, loss from full logits as transformers computes it.

    python benchmarks/train_gpu.py                       # every row, 4 layers
    python benchmarks/train_gpu.py --rows kimitune --seq 4096 --ckpt off
    python benchmarks/train_gpu.py --rows kimitune --seq 16384 --ckpt 1,2   # recompute 1 (2) of the layers
    python benchmarks/train_gpu.py --rows kimitune,kimitune+fp8,kimitune+int8 --seq 4096,16384 --ckpt off,on
                                                         # issue 24: the FP8 (and int8) rows against bf16

``--ckpt``: "off", "on" (every decoder layer recomputes, as the peer's gradient checkpointing) or a number of
layers that recompute (``gradient_checkpointing_layers``; kimitune only, the peer has no such setting).

FLOPs counted per token (for MFU): 2 per multiply-add of every weight a token uses (its 8 routed experts, the
shared expert, attention and KDA projections, the LM head) in the forward, the same again for the input-gradient
backward through the frozen weights, 6 per LoRA multiply-add, plus attention (MLA: causal QK^T and PV, 3x the
forward) and the KDA chunk recurrence (3x its forward). Peak: 989 TFLOP/s dense bf16 (H100 SXM datasheet), for the
``+fp8`` rows too (their FP8 products could reach twice that).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass, replace

import torch

import lora_peers  # benchmarks/lora_peers.py: the two LoRA set-ups, shared with train_cpu.py
from kimitune.model import KimiLinearConfig
from kimitune.train.trainer import frozen_startup_objects
from lora_peers import random_state

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
PROFILE = False
DEVICE = "cuda"  # --smoke runs the tiny preset on the CPU to check the script itself


@dataclass
class Row:
    tool: str  # "kimitune" | "kimitune+experts" | "kimitune+fp8" | "kimitune+int8" (lora_peers.TOOL_QUANT) | "peer"
    seq: int
    ckpt: bool
    ckpt_layers: int | None = None  # with ckpt: how many layers recompute (None: all)
    loss: str = "fused"  # kimitune's linear_cross_entropy impl

    @property
    def ckpt_text(self) -> str:
        if not self.ckpt:
            return "off"
        return "on" if self.ckpt_layers is None else f"{self.ckpt_layers} layer(s)"


def model_config(layers: int, preset: str) -> KimiLinearConfig:
    base = KimiLinearConfig.preset(preset)
    if layers == base.num_hidden_layers:
        return base
    kda = [i for i in range(1, layers + 1) if i % 4 != 0]
    return replace(base, num_hidden_layers=layers, kda_layers=kda, full_attn_layers=[i for i in range(1, layers + 1) if i not in kda])


def active_linear_params(cfg: KimiLinearConfig) -> int:
    """Weights one token multiplies with (embedding lookup excluded)."""
    h = cfg.hidden_size
    kda_w = cfg.kda_num_heads * cfg.kda_head_dim
    kda = 4 * h * kda_w + 2 * (h * cfg.kda_head_dim + cfg.kda_head_dim * kda_w) + h * cfg.kda_num_heads
    q = h * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    mla = (q + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
           + cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
           + cfg.num_attention_heads * cfg.v_head_dim * h)
    moe = (3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_token + cfg.num_shared_experts)
           + h * cfg.num_experts)
    dense = 3 * h * cfg.intermediate_size
    total = h * cfg.vocab_size
    for i in range(cfg.num_hidden_layers):
        total += kda if cfg.is_kda_layer(i) else mla
        total += moe if cfg.is_moe_layer(i) else dense
    return total


def flops_per_token(cfg: KimiLinearConfig, seq: int, lora_params: int) -> float:
    flops = 4 * active_linear_params(cfg) + 6 * lora_params
    for i in range(cfg.num_hidden_layers):
        if cfg.is_kda_layer(i):
            h, k = cfg.kda_num_heads, cfg.kda_head_dim
            # chunked delta rule (chunks of 64): intra-chunk products and state read/update, per token
            fwd = 2 * h * (64 * 3 * k + 4 * k * k)
        else:
            qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            fwd = 2 * cfg.num_attention_heads * (seq / 2) * (qk + cfg.v_head_dim)
        flops += 3 * fwd
    return flops


def random_model(cfg: KimiLinearConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights (kimitune's initialisation), as a CPU state dict both tools load."""
    return random_state(cfg, torch.bfloat16, DEVICE, seed)


def lora_train_step(model, options, device: str, lr: float = 1e-4):
    """kimitune's training step for ``model``'s trainable parameters (``kimitune.train.step.TrainStep``: what
    ``kimitune train`` runs, clipping at 1.0 and the device-side non-finite skip included), fused AdamW at ``lr``
    -> ``step(ids [1, T] int64) -> the step's mean token loss`` (a device tensor), one unpacked sequence."""
    from kimitune.data.packing import Batch
    from kimitune.train.step import TrainStep

    params = [p for p in model.parameters() if p.requires_grad]
    train_step = TrainStep(model, torch.optim.AdamW(params, lr=lr, fused=True), device, options=options,
                           max_grad_norm=1.0)

    def step(ids):
        seq = ids.shape[1]
        batch = Batch(input_ids=ids, labels=ids, cu_seqlens=None, num_tokens=seq, num_label_tokens=seq - 1)
        return train_step([batch], batch.num_label_tokens).loss

    return step


def kimitune_step(cfg, state, row: Row):
    """kimitune's model and its training step (``lora_train_step``) -> (model, step() -> the step's loss tensor)."""
    from dataclasses import replace as replace_options

    model, _, options = lora_peers.build_kimitune(cfg, state, DEVICE, row.ckpt, experts=row.tool == "kimitune+experts",
                                                  ckpt_layers=row.ckpt_layers,
                                                  quant=lora_peers.TOOL_QUANT.get(row.tool))
    step = lora_train_step(model, replace_options(options, loss_impl=row.loss), DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (1, row.seq), generator=torch.Generator().manual_seed(1))
    return model, lambda: step(ids)


def peer_step(cfg, state, row: Row):
    """The peer's model and a step as transformers + PEFT train: loss from full logits, backward, fused AdamW."""
    model, loss_fn = lora_peers.build_peer(cfg, state, DEVICE, torch.bfloat16, row.ckpt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, row.seq), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))

    def step():
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(cfg, state, row: Row, warmup: int, steps: int) -> dict:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build = peer_step if row.tool == "peer" else kimitune_step
    model, step = build(cfg, state, row)
    model_gib = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    if DEVICE == "cuda":  # the peak is the step's: a quantised row's build held its weights in bf16 a moment
        torch.cuda.reset_peak_memory_stats()
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses = []
    try:
        # Both tools' steps run with the objects built so far frozen out of the garbage collector's passes, as
        # kimitune's trainer runs them (transformers' Trainer does not; here the peer gets it too).
        with frozen_startup_objects():
            for i in range(warmup + steps):
                if i == warmup:
                    _sync()
                    start = time.perf_counter()
                losses.append(step())
        _sync()
        seconds = (time.perf_counter() - start) / steps
        if PROFILE:
            print_profile(step, str(row))
        result = {"tokens_per_s": row.seq / seconds, "step_ms": 1000 * seconds, "first_loss": losses[0].item(),
                  "peak_gib": _peak_gib(), "weights_gib": model_gib}
    except torch.cuda.OutOfMemoryError:
        result = {"oom": True, "peak_gib": _peak_gib()}
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)
    if "tokens_per_s" in result:
        result["mfu"] = flops_per_token(cfg, row.seq, lora_params) * result["tokens_per_s"] / peak
    result.update(tool=row.tool, seq=row.seq, ckpt=row.ckpt_text, loss=row.loss, trainable=lora_params,
                  planned_gib=lora_peers.planned_peak_gib(cfg, row.tool, row.seq, row.ckpt, row.ckpt_layers))
    del model, step
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def print_profile(step, label: str, rows: int = 40) -> None:
    """Runs ``step`` once under the profiler and prints its ops by CUDA time, with the step's wall time beside the
    kernels' total: the difference is time the GPU waited for the host. With ``PROFILE_SHAPES=FILE`` in the
    environment it also records input shapes and writes the ops grouped by shape to FILE (appended)."""
    from torch.profiler import ProfilerActivity, profile

    shapes_file = os.environ.get("PROFILE_SHAPES")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=bool(shapes_file)) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    print(f"--- profile: {label}; step wall time under the profiler {1000 * wall:.1f} ms ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    print("--- the same step's kernels by their own time ---")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90))
    if shapes_file:
        with open(shapes_file, "a") as f:
            f.write(f"--- {label} ---\n")
            f.write(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total", row_limit=150, max_name_column_width=40, max_shapes_column_width=120))


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", default="kimitune,kimitune+experts,peer")
    parser.add_argument("--seq", default="4096,16384")
    parser.add_argument("--ckpt", default="off,on")
    parser.add_argument("--loss", default="fused", help="kimitune's loss impl(s): fused (kimitune.ops.loss) or cce "
                        "(cut-cross-entropy); comma-separated for one row each")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of one step per row")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: checks the script only")
    args = parser.parse_args()

    global DEVICE, PROFILE
    DEVICE = "cpu" if args.smoke else "cuda"
    PROFILE = args.profile
    cfg = model_config(args.layers, "tiny" if args.smoke else "kimi-linear-48b-a3b")
    state = random_model(cfg)
    total = sum(v.numel() for v in state.values())
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}: {args.layers} layers, {total / 1e9:.2f}B parameters, "
          f"{active_linear_params(cfg) / 1e9:.2f}B active linear weights per token")
    rows = [Row(tool, int(seq), ckpt != "off", int(ckpt) if ckpt.isdigit() else None, loss)
            for tool in args.rows.split(",") for seq in args.seq.split(",") for ckpt in args.ckpt.split(",")
            for loss in (args.loss.split(",") if tool != "peer" else ["-"])]
    results = []
    for row in rows:
        if row.tool == "kimitune+experts" and not row.ckpt and row.seq > 4096:
            continue
        if row.tool == "peer" and row.ckpt_layers is not None:
            continue
        result = measure(cfg, state, row, args.warmup, args.steps)
        results.append(result)
        print(json.dumps(result), flush=True)
    print("\n| tool | loss | seq | checkpointing | tokens/s | MFU | peak GiB | planned GiB | trainable |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in results:
        speed = "OOM" if r.get("oom") else f"{r['tokens_per_s'] / 1e3:.1f}k"
        mfu = "-" if r.get("oom") else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['tool']} | {r['loss']} | {r['seq']} | {r['ckpt']} | {speed} | {mfu} | "
              f"{r['peak_gib']:.1f} | {r['planned_gib']:.1f} | {r['trainable'] / 1e6:.1f}M |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
