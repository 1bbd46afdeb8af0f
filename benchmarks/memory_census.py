"""Where a LoRA training step's GPU memory goes, layer by layer: the measurements kimitune/plan.py is built on.

    python benchmarks/memory_census.py --seq 2048,4096,8192        # 48B widths, 4 layers, bf16, as train_gpu.py

For each sequence length, with and without gradient checkpointing, one training step of ``train_gpu.py``'s
kimitune row (same model, same LoRA, same fused AdamW), instrumented with forward hooks that read the CUDA
allocator's counters: bytes each decoder layer (and the loss) leaves allocated for the backward, the transient
peak above that inside it, the peak of the backward and of the optimizer step. Prints one JSON line per run
and a per-token table (bytes per token per layer kind), so the analytic model's terms can be checked directly.
"""

from __future__ import annotations

import argparse
import json

import torch

import lora_peers
from train_gpu import model_config


def census(cfg, state, seq: int, ckpt: bool) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, loss_fn, _ = lora_peers.build_kimitune(cfg, state, "cuda", ckpt)
    weights = torch.cuda.memory_allocated()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    layers: list[dict] = []
    forward = [False]  # hooks only measure the forward (checkpointing re-runs layers in the backward)

    def pre(module, args):
        if not forward[0]:
            return
        layers.append({"kind": ("kda" if module.is_kda else "mla") + ("+moe" if module.is_moe else "+dense"),
                       "start": torch.cuda.memory_allocated()})
        torch.cuda.reset_peak_memory_stats()

    def post(module, args, out):
        if not forward[0]:
            return
        row = layers[-1]
        row["kept"] = torch.cuda.memory_allocated() - row["start"]
        row["transient"] = torch.cuda.max_memory_allocated() - row["start"] - row["kept"]

    hooks = []
    for layer in model.model.layers:
        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    result = {"seq": seq, "ckpt": ckpt, "weights_gib": weights / 2**30}
    for step in range(2):  # the second step is measured (optimizer states exist by then)
        layers.clear()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward[0] = True
        loss = loss_fn(ids)
        forward[0] = False
        after_forward = torch.cuda.memory_allocated()
        forward_peak = max(torch.cuda.max_memory_allocated(), max(r["start"] + r["kept"] + r["transient"]
                                                                  for r in layers))
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        backward_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt_peak = torch.cuda.max_memory_allocated()
    last = layers[-1]
    result.update(
        step_start_gib=start / 2**30, after_forward_gib=after_forward / 2**30, forward_peak_gib=forward_peak / 2**30,
        backward_peak_gib=backward_peak / 2**30, optimizer_peak_gib=opt_peak / 2**30,
        loss_kept_mib=(after_forward - last["start"] - last["kept"]) / 2**20,
        layers=[{"kind": r["kind"], "kept_mib": r["kept"] / 2**20, "transient_mib": r["transient"] / 2**20,
                 "kept_per_token": r["kept"] / seq, "transient_per_token": r["transient"] / seq} for r in layers],
        trainable=sum(p.numel() for p in params),
    )
    for h in hooks:
        h.remove()
    del model, opt, loss_fn, params, loss
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", default="2048,4096,8192")
    parser.add_argument("--ckpt", default="off,on")
    args = parser.parse_args()
    cfg = model_config(args.layers, "kimi-linear-48b-a3b")
    state = lora_peers.random_state(cfg, torch.bfloat16, "cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    for seq in (int(s) for s in args.seq.split(",")):
        for ckpt in (c == "on" for c in args.ckpt.split(",")):
            print(json.dumps(census(cfg, state, seq, ckpt)), flush=True)


if __name__ == "__main__":
    main()
