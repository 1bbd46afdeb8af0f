"""LoRA training speed on several GPUs: kimitune's FSDP2 (``kimitune.train.distributed``) under torchrun.

The model is ``train_gpu.py``'s (Kimi-Linear-48B-A3B's widths, ``--layers`` layers in the release's pattern; 27 is
the whole 48B model), random bf16 weights, LoRA r=16 alpha=32 on every linear layer (``--experts``: also the
stacked experts), AdamW, one sequence of ``--seq`` random tokens per GPU per step, so the global batch grows with
the GPU count (weak scaling). For every GPU count of ``--gpus`` the script runs itself under
``torch.distributed.run --standalone --nproc_per_node N``, and prints tokens/s (all GPUs together), tokens/s per
GPU, MFU per GPU (``train_gpu.flops_per_token``), the largest peak memory of any rank, and the scaling factor
tokens/s(N) / tokens/s(first count) at the same ``--seq`` and ``--reshard``. One launch per GPU count measures every
sequence length and reshard setting on the same model (``set_reshard_after_forward`` on the decoder layers).

    python benchmarks/train_multi_gpu.py                                  # 4 layers, 1 and 2 GPUs, 8192 tokens
    python benchmarks/train_multi_gpu.py --seq 8192,16384 --reshard on,off
    python benchmarks/train_multi_gpu.py --layers 27 --gpus 2 --ckpt on   # the whole 48B model on 2 GPUs
    python benchmarks/train_multi_gpu.py --smoke                          # tiny preset, gloo on the CPU

Every rank builds the model on the meta device, shards it, and draws random values into its own shards only
(``init_shards``), so no GPU or host ever holds the whole model: the 48B model in bf16 (98 GiB) fits on 2 x 80 GB.
The weights differ from ``train_gpu.py``'s draw, which does not matter for speed.
"""

from __future__ import annotations

import argparse
import json
import math
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
    from kimitune.data.packing import Batch
    from kimitune.model import KimiLinearForCausalLM, RunOptions
    from kimitune.train.distributed import init_from_env, shard_model
    from kimitune.train.step import TrainStep

    device_type = "cpu" if args.smoke else "cuda"
    world = init_from_env(device_type)
    device = world.device
    cfg = model_config(args.layers, "tiny" if args.smoke else "kimi-linear-48b-a3b")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the meta tensors carry the final dtype: shards are allocated in it
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    torch.set_default_dtype(default)
    apply_lora(model, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear",
                                   target_experts=args.experts))
    options = RunOptions(recompute_layers=model.recomputed_layers() if args.ckpt == "on" else frozenset())
    model = shard_model(model, world, bf16=not args.smoke)
    model.to_empty(device=device)
    torch.manual_seed(world.rank)  # each rank draws its own shards
    init_shards(model, cfg.initializer_range)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in params)  # global numbers: parameters are DTensors
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    # kimitune's own step (what `kimitune train` runs): clipping, the loss summed over the ranks, the device-side skip
    train_step = TrainStep(model, opt, device, options=options, max_grad_norm=1.0, world=world)  # LoRA: no autocast

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    def measure(seq: int) -> dict:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1 + world.rank))
        batch = Batch(input_ids=ids, labels=ids, cu_seqlens=None, num_tokens=seq, num_label_tokens=seq - 1)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync()
                start = time.perf_counter()
            stats = train_step([batch], (seq - 1) * world.size, world.size)
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        return {"tokens_per_s": world.size * seq / seconds, "step_ms": 1000 * seconds,
                "last_loss": stats.loss.item()}

    rows = []
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)
    for seq in [int(s) for s in args.seq.split(",")]:
        for reshard in args.reshard.split(","):
            for layer in model.model.layers:  # the root keeps its weights: its output (a dataclass) carries no
                layer.set_reshard_after_forward(reshard == "on", recurse=False)  # pre-backward hook to re-gather
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                result = measure(seq)
            except torch.cuda.OutOfMemoryError:
                result = {"oom": True}
                opt.zero_grad(set_to_none=True)
            peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                                device=device, dtype=torch.float64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            result.update(gpus=world.size, layers=cfg.num_hidden_layers, seq=seq, ckpt=args.ckpt, reshard=reshard,
                          experts=args.experts, trainable=lora_params, peak_gib=peak.item(), device=name)
            if "tokens_per_s" in result:
                result["tokens_per_s_per_gpu"] = result["tokens_per_s"] / world.size
                result["mfu"] = flops_per_token(cfg, seq, lora_params) * result["tokens_per_s_per_gpu"] / peak_flops
            rows.append(result)
    if world.is_main:
        Path(args.out).write_text(json.dumps(rows))
    # Every rank leaves together, as the trainer's ranks do: a rank that tore the gloo group down while rank 0 was
    # still writing aborted ("terminate called without an active exception") in about one smoke run in five.
    world.barrier()
    world.shutdown()


@torch.no_grad()
def init_shards(model: torch.nn.Module, std: float) -> None:
    """Random values in every rank's local shard of every parameter and buffer, after the model's own
    initialisation (``modeling.init_weights``, the adapters'): normal(std) matrices, unit norms, zero LoRA B and
    router bias, fla's decay init, the short conv's and LoRA A's uniform bounds."""
    from torch.distributed.tensor import DTensor

    from kimitune.model.kda import KDAForgetGate
    from kimitune.model.norm import GatedRMSNorm, RMSNorm

    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if isinstance(module, (RMSNorm, GatedRMSNorm)):
                local.fill_(1.0)
            elif name in ("lora_B", "e_score_correction_bias"):
                local.zero_()
            elif name == "lora_A" or isinstance(module, torch.nn.Conv1d):
                bound = 1 / math.sqrt(tensor.shape[-1])  # Kaiming-uniform(a=sqrt 5) over the fan-in
                local.uniform_(-bound, bound)
            elif isinstance(module, KDAForgetGate) and name == "A_log":
                local.uniform_(1, 16).log_()
            elif isinstance(module, KDAForgetGate) and name == "dt_bias":
                dt = torch.empty_like(local, dtype=torch.float32).uniform_(math.log(1e-3), math.log(1e-1)).exp()
                local.copy_(dt + torch.log(-torch.expm1(-dt)))
            else:
                local.normal_(0.0, std)


def launch(args, gpus: int) -> list[dict]:
    """Runs this script's worker under torchrun on ``gpus`` processes; returns rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                   str(Path(__file__).resolve()), "--worker", "--out", str(out), "--layers", str(args.layers),
                   "--seq", args.seq, "--reshard", args.reshard, "--ckpt", args.ckpt, "--warmup", str(args.warmup),
                   "--steps", str(args.steps)]
        command += ["--smoke"] * args.smoke + ["--experts"] * args.experts
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        if args.smoke:
            env["OMP_NUM_THREADS"] = "1"
        finished = subprocess.run(command, env=env)
        if finished.returncode != 0 or not out.is_file():
            return [{"gpus": gpus, "failed": finished.returncode}]
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="27 = the whole Kimi-Linear-48B-A3B")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, comma-separated")
    parser.add_argument("--seq", default="8192", help="tokens per GPU per step, comma-separated")
    parser.add_argument("--ckpt", default="off", choices=["off", "on"], help="activation checkpointing")
    parser.add_argument("--experts", action="store_true", help="also put LoRA on the stacked experts")
    parser.add_argument("--reshard", default="on", help="reshard_after_forward settings to run, comma-separated: "
                        "on (free gathered weights after forward) and/or off (keep them for the backward)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, gloo on the CPU: checks the script only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke and args.seq == "8192":
        args.seq = "256"

    results = [row for n in args.gpus.split(",") for row in launch(args, int(n))]
    # scaling: against the first GPU count's row of the same sequence length and reshard setting
    base = {}
    for r in results:
        if "tokens_per_s" in r:
            base.setdefault((r["seq"], r["reshard"]), r["tokens_per_s"])
    print(f"\n| GPUs | layers | seq/GPU | ckpt | reshard | tokens/s | tokens/s/GPU | scaling | MFU/GPU | peak GiB | "
          f"device |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"| {r['gpus']} | {'OOM' if r.get('oom') else 'failed'} ||||||||||")
            continue
        print(f"| {r['gpus']} | {r['layers']} | {r['seq']} | {r['ckpt']} | {r['reshard']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s'] / base[r['seq'], r['reshard']]:.2f}x | "
              f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {r['device']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
