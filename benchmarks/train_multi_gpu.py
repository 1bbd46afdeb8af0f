"""LoRA training speed on several GPUs: kimitune's FSDP2 (``kimitune.train.distributed``) under torchrun.

The model is ``train_gpu.py``'s (Kimi-Linear-48B-A3B's widths, ``--layers`` layers in the release's pattern; 27 is
the whole 48B model), random bf16 weights, LoRA r=16 alpha=32 on every linear layer (``--experts``: also the
stacked experts), AdamW, one sequence of ``--seq`` random tokens per GPU per step, so the global batch grows with
the GPU count (weak scaling). For every GPU count of ``--gpus`` the script runs itself under
``torch.distributed.run --standalone --nproc_per_node N``, and prints tokens/s (all GPUs together), tokens/s per
GPU, MFU per GPU (``train_gpu.flops_per_token``), the largest peak memory of any rank, and the scaling factor
tokens/s(N) / tokens/s(first count).

    python benchmarks/train_multi_gpu.py                                  # 4 layers, 1 and 2 GPUs, 8192 tokens
    python benchmarks/train_multi_gpu.py --layers 27 --gpus 2 --ckpt on   # the whole 48B model on 2 GPUs
    python benchmarks/train_multi_gpu.py --smoke                          # tiny preset, gloo on the CPU

Every rank builds the whole model on its GPU before ``fully_shard`` cuts it (the 48B model: 98 GiB for a moment).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def worker(args) -> None:
    """One rank: build, shard, train ``warmup + steps`` steps; rank 0 writes the result to ``args.out``."""
    import torch.distributed as dist
    from lora_peers import LORA_ALPHA, LORA_R
    from train_gpu import PEAK_FLOPS, flops_per_token, model_config

    from kimitune.adapters import LoraSettings, apply_lora
    from kimitune.model import KimiLinearForCausalLM
    from kimitune.train.distributed import clip_grad_norm, init_from_env, shard_model

    device_type = "cpu" if args.smoke else "cuda"
    world = init_from_env(device_type)
    device = world.device
    cfg = model_config(args.layers, "tiny" if args.smoke else "kimi-linear-48b-a3b")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its final dtype, on its device: no float32 copy of the weights
    with torch.device(device):
        model = KimiLinearForCausalLM(cfg)
    torch.set_default_dtype(default)
    apply_lora(model, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear",
                                   target_experts=args.experts))
    model.set_gradient_checkpointing(args.ckpt == "on")
    model = shard_model(model, world, bf16=not args.smoke, reshard_after_forward=not args.no_reshard)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in params)  # global numbers: parameters are DTensors
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if device.type == "cuda" else None)
    gen = torch.Generator(device=device).manual_seed(1 + world.rank)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), device=device, generator=gen)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {}
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync()
                start = time.perf_counter()
            with autocast:
                loss = model(ids, labels=ids, return_logits=False, loss_reduction="sum").loss / (args.seq * world.size)
            loss.backward()
            clip_grad_norm(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        result = {"tokens_per_s": world.size * args.seq / seconds, "step_ms": 1000 * seconds,
                  "last_loss": loss.item() * world.size}
    except torch.cuda.OutOfMemoryError:
        result = {"oom": True}
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                        device=device, dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if world.is_main:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        result.update(gpus=world.size, layers=cfg.num_hidden_layers, seq=args.seq, ckpt=args.ckpt,
                      experts=args.experts, trainable=lora_params, peak_gib=peak.item(), device=name)
        if "tokens_per_s" in result:
            result["tokens_per_s_per_gpu"] = result["tokens_per_s"] / world.size
            peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)
            result["mfu"] = flops_per_token(cfg, args.seq, lora_params) * result["tokens_per_s_per_gpu"] / peak_flops
        Path(args.out).write_text(json.dumps(result))
    world.shutdown()


def launch(args, gpus: int) -> dict:
    """Runs this script's worker under torchrun on ``gpus`` processes; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                   str(Path(__file__).resolve()), "--worker", "--out", str(out), "--layers", str(args.layers),
                   "--seq", str(args.seq), "--ckpt", args.ckpt, "--warmup", str(args.warmup),
                   "--steps", str(args.steps)]
        command += ["--smoke"] * args.smoke + ["--experts"] * args.experts + ["--no-reshard"] * args.no_reshard
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        if args.smoke:
            env["OMP_NUM_THREADS"] = "1"
        finished = subprocess.run(command, env=env)
        if finished.returncode != 0 or not out.is_file():
            return {"gpus": gpus, "failed": finished.returncode}
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="27 = the whole Kimi-Linear-48B-A3B")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, comma-separated")
    parser.add_argument("--seq", type=int, default=8192, help="tokens per GPU per step")
    parser.add_argument("--ckpt", default="off", choices=["off", "on"], help="activation checkpointing")
    parser.add_argument("--experts", action="store_true", help="also put LoRA on the stacked experts")
    parser.add_argument("--no-reshard", action="store_true", help="keep gathered weights from forward to backward")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, gloo on the CPU: checks the script only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke and args.seq == 8192:
        args.seq = 256

    results = [launch(args, int(n)) for n in args.gpus.split(",")]
    base = next((r["tokens_per_s"] for r in results if "tokens_per_s" in r), None)
    print(f"\n| GPUs | layers | seq/GPU | ckpt | tokens/s | tokens/s/GPU | scaling | MFU/GPU | peak GiB | device |\n"
          f"|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"| {r['gpus']} | {'OOM' if r.get('oom') else 'failed'} |||||||||")
            continue
        print(f"| {r['gpus']} | {r['layers']} | {r['seq']} | {r['ckpt']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {100 * r['mfu']:.1f}% | "
              f"{r['peak_gib']:.1f} | {r['device']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
