"""LoRA training speed on the CPU: kimitune against transformers + PEFT, same weights, same data, same run.

    python benchmarks/train_cpu.py                        # quickstart model and data, 2 threads
    python benchmarks/train_cpu.py --threads 1 --steps 6 --rounds 3
    python benchmarks/train_cpu.py --profile kimitune     # torch.profiler table of one kimitune step

The model is the quickstart's (``init_from_config`` of examples/quickstart.yaml: the tiny Kimi Linear config,
4 layers KDA/KDA/KDA/MLA, first dense, 8 experts top-2), with random float32 weights (kimitune's initialisation,
seed 0) that both tools load. The data is the quickstart's training file, tokenised and packed as the quickstart
packs it (sequence_len 256 x micro_batch_size 8: one row of up to 2048 tokens per step). Both sides train LoRA
(r=16, alpha=32, all-linear, no dropout; the peer starts from kimitune's LoRA matrices, copied) with AdamW
(lr 1e-3) on the LoRA weights; each step is forward,
backward, optimiser step.

transformers' PyTorch path on the CPU cannot keep packed sequences apart (its KDA fallback and short conv take
no ``cu_seqlens``), so the compared rows feed each packed row as one sequence to both tools (same tokens, same
labels, same loss); the extra row ``kimitune, packed`` is kimitune as its trainer runs, with ``cu_seqlens``.

Timing: ``--warmup`` steps per tool are excluded; then ``--rounds`` rounds, each timing ``--steps`` steps of every
tool in turn (so background load falls on both alike); tokens/s = tokens / wall seconds of a round, best round
reported (the machine is shared; the median is printed too). The first-step losses (before any update, on the
first batch) must agree: same weights, same data; so must the second (after one AdamW step on both sides' LoRA
gradients), which checks the backward too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date

import torch

import kimitune  # noqa: F401  (sets OpenMP's spin count before torch's thread pool starts)
import lora_peers
from kimitune.config import load_config
from kimitune.data import load_tokenizer, make_batches, prepare_datasets
from kimitune.model import KimiLinearConfig


def quickstart_batches(config_path: str, count: int):
    """The first ``count`` micro-batches of epoch 0, as the quickstart config packs them; and the config."""
    with tempfile.TemporaryDirectory() as cache:
        cfg, _ = load_config(config_path, {"dataset_prepared_path": cache})
        tokenizer = load_tokenizer(cfg.tokenizer_path)
        train = prepare_datasets(cfg, tokenizer, progress=False).train
    batches = make_batches(train, cfg.sequence_len, cfg.micro_batch_size, cfg.sample_packing, cfg.seed, 0,
                           tokenizer.pad_token_id or 0)
    if len(batches) < count:
        raise SystemExit(f"the data holds {len(batches)} batches, fewer than the {count} asked for")
    return cfg, batches[:count]


class Runner:
    """One tool's model, optimiser and step function."""

    def __init__(self, name: str, model, loss_fn, packed: bool) -> None:
        self.name, self.model, self.loss_fn, self.packed = name, model, loss_fn, packed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.round_seconds: list[float] = []
        self.round_cpu: list[float] = []
        self.warmup_losses: list[float] = []

    def step(self, batch) -> float:
        if self.packed:
            loss = self.loss_fn(batch.input_ids, batch.labels, batch.cu_seqlens)
        else:
            loss = self.loss_fn(batch.input_ids, batch.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/quickstart.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per tool per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="kimitune,peer,kimitune-packed")
    parser.add_argument("--profile", default=None, help="kimitune | peer: print a profile of one step of it")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg, batches = quickstart_batches(args.config, args.warmup + args.steps)
    model_cfg = KimiLinearConfig.from_pretrained(cfg.init_from_config)
    state = lora_peers.random_state(model_cfg, torch.float32, "cpu", seed=0)
    tokens = [b.input_ids.numel() for b in batches]
    print(f"command: {' '.join([sys.executable.rsplit('/', 1)[-1]] + sys.argv)}")
    print(f"date {date.today()}, torch {torch.__version__}, threads {torch.get_num_threads()} "
          f"(interop {torch.get_num_interop_threads()}), float32")
    print(f"model {cfg.init_from_config}: {sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters; data "
          f"{cfg.datasets[0].path}, packed {cfg.sequence_len} x {cfg.micro_batch_size}: {len(batches)} rows of "
          f"{min(tokens)}-{max(tokens)} tokens")

    runners: list[Runner] = []
    for row in args.rows.split(","):
        torch.manual_seed(0)  # every kimitune row draws the same LoRA A matrices; the peer gets them copied
        if row == "peer":
            model, loss_fn = lora_peers.build_peer(model_cfg, state, "cpu", torch.float32)
        else:
            model, loss_fn, _ = lora_peers.build_kimitune(model_cfg, state, "cpu")
        runners.append(Runner(row, model, loss_fn, packed=row == "kimitune-packed"))
    ours = next((r.model for r in runners if r.name == "kimitune"), None)
    for runner in runners:
        if runner.name == "peer" and ours is not None:
            lora_peers.copy_lora_weights(ours, runner.model)

    for runner in runners:  # warm-up; the first step's loss is the one before any update
        runner.warmup_losses = [runner.step(batch) for batch in batches[: max(args.warmup, 1)]]
    timed = batches[args.warmup:]
    for _ in range(args.rounds):
        for runner in runners:
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in timed:
                runner.step(batch)
            runner.round_seconds.append(time.perf_counter() - start)
            runner.round_cpu.append(time.process_time() - start_cpu)

    timed_tokens = sum(b.input_ids.numel() for b in timed)
    print(f"\n{timed_tokens} tokens per round ({len(timed)} steps), {args.rounds} rounds\n")
    print("| tool | trainable | first loss | 2nd loss | tokens/s (best round) | tokens/s (median) | "
          "CPU s per step (best) |")
    print("|---|---|---|---|---|---|---|")
    speed = {}
    for r in runners:
        best, median = timed_tokens / min(r.round_seconds), timed_tokens / statistics.median(r.round_seconds)
        speed[r.name] = best
        second = f"{r.warmup_losses[1]:.6f}" if len(r.warmup_losses) > 1 else "-"
        print(f"| {r.name} | {r.trainable:,} | {r.warmup_losses[0]:.6f} | {second} | {best:,.0f} | {median:,.0f} | "
              f"{min(r.round_cpu) / len(timed):.3f} |")
    if "kimitune" in speed and "peer" in speed:
        losses = {r.name: r.warmup_losses for r in runners}
        gaps = ", ".join(f"{abs(a - b):.1e}" for a, b in zip(losses["kimitune"], losses["peer"]))
        print(f"\nkimitune / peer: {speed['kimitune'] / speed['peer']:.2f}x tokens/s (best rounds); "
              f"|kimitune - peer| loss of each warm-up step: {gaps}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        runner = next(r for r in runners if r.name == args.profile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.step(timed[0])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))


if __name__ == "__main__":
    main()
