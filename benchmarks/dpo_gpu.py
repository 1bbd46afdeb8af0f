"""DPO with LoRA on one GPU: kimitune against TRL's DPOTrainer + PEFT, same weights, same pairs, same run (issue 26).

The model is train_gpu.py's: Kimi-Linear-48B-A3B's widths with ``--layers`` layers, random bf16 weights. Both tools
train LoRA (r=16, alpha=32, all-linear) with AdamW, beta 0.1, on ``--pairs`` pairs a step of random tokens: a
``--prompt``-token prompt, and chosen and rejected replies of ``--reply`` tokens each.

- kimitune: the pairs packed into one row (both sequences of every pair, ``cu_seqlens``), the reference
  log-probabilities computed once before the timed steps (``kimitune.train.preference.reference_log_probs``: the
  model as it starts), ``TrainStep`` with the ``PreferenceObjective``: what `kimitune train` with ``rl: dpo`` runs.
- TRL 1.16: ``DPOTrainer`` on transformers' ``KimiLinearForCausalLM`` with PEFT's LoRA (the reference is the model
  with its adapter disabled, computed every step, TRL's default), the same pairs pre-tokenised, padded per batch.

Tokens/s counts the tokens of both sequences of every pair (no padding) over the timed steps; peak is the GPU's.

    python benchmarks/dpo_gpu.py                         # both tools, 4 layers
    python benchmarks/dpo_gpu.py --tools kimitune --pairs 8 --prompt 1024 --reply 512
    python benchmarks/dpo_gpu.py --smoke                 # tiny preset on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

import lora_peers  # benchmarks/lora_peers.py: the LoRA set-ups shared with train_gpu.py
from train_gpu import model_config

DEVICE = "cuda"


def random_pairs(pairs: int, prompt: int, reply: int, vocab: int, seed: int = 1) -> list[dict]:
    """``pairs`` of random token ids (below the vocabulary's last 64 ids, where the special tokens are)."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, vocab - 64, (n,), generator=generator).tolist()  # noqa: E731
    return [{"prompt_ids": draw(prompt), "chosen_ids": draw(reply), "rejected_ids": draw(reply)}
            for _ in range(pairs)]


def packed_batch(examples: list[dict]):
    """The pairs as kimitune's ``PreferenceBatch``: one row, pair k's chosen at sequence 2k, its rejected at 2k + 1."""
    from kimitune.data.preference import PreferenceBatch

    ids, labels, lengths = [], [], []
    for example in examples:
        for reply in (example["chosen_ids"], example["rejected_ids"]):
            ids += example["prompt_ids"] + reply
            labels += [-100] * len(example["prompt_ids"]) + reply
            lengths.append(len(example["prompt_ids"]) + len(reply))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    trained = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    return PreferenceBatch(torch.tensor([ids]), torch.tensor([labels]), cu, torch.arange(len(examples)),
                           len(ids), trained)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def _fresh() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def kimitune_row(cfg, state, examples, warmup: int, steps: int, ckpt: bool) -> dict:
    from kimitune.train.preference import PreferenceObjective, PreferenceSettings, reference_log_probs
    from kimitune.train.step import TrainStep

    _fresh()
    model, _, options = lora_peers.build_kimitune(cfg, state, DEVICE, ckpt=ckpt)
    built = _allocated_gib()
    batch = packed_batch(examples)
    reference = reference_log_probs(model, [batch], len(examples), DEVICE, options)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, torch.optim.AdamW(params, lr=1e-5, fused=DEVICE == "cuda"), DEVICE, options=options,
                     max_grad_norm=1.0, objective=PreferenceObjective(PreferenceSettings("dpo", beta=0.1), reference))
    counts = step.objective.denominator([batch])
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            start = time.perf_counter()
        losses.append(step([batch], counts).loss)
    _sync()
    seconds = (time.perf_counter() - start) / steps
    result = {"tool": "kimitune", "tokens_per_s": batch.num_tokens / seconds, "step_ms": 1e3 * seconds,
              "peak_gib": _peak_gib(), "built_gib": built, "first_loss": losses[0].item()}
    del model, step
    return result


def trl_row(cfg, state, examples, warmup: int, steps: int, tokenizer_dir: str, work: str, ckpt: bool) -> dict:
    """TRL's DPOTrainer + PEFT; step times from a callback, the timed steps after ``warmup``."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from kimitune.data import load_tokenizer

    _fresh()
    model, _ = lora_peers.build_peer(cfg, state, DEVICE, torch.bfloat16, peft=False)
    built = _allocated_gib()
    args = DPOConfig(output_dir=work, per_device_train_batch_size=len(examples), max_steps=warmup + steps,
                     learning_rate=1e-5, beta=0.1, report_to=[], logging_steps=10**6, save_strategy="no",
                     bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", max_length=None, dataloader_num_workers=0,
                     remove_unused_columns=False, gradient_checkpointing=ckpt)
    marks: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            _sync()
            marks.append(time.perf_counter())

    # The pairs go in as TRL's own pre-tokenised examples (its collator's input), in place of the dataset it
    # tokenised at construction: both tools train on the very same tokens.
    tokenizer = load_tokenizer(tokenizer_dir)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                         peft_config=LoraConfig(r=lora_peers.LORA_R, lora_alpha=lora_peers.LORA_ALPHA,
                                                target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
                         callbacks=[StepTimes()])
    trainer.train_dataset = Dataset.from_list(examples * (warmup + steps))
    tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    trainer.train()
    seconds = (marks[-1] - marks[warmup - 1]) / steps if warmup else (marks[-1] - marks[0]) / max(steps - 1, 1)
    result = {"tool": "trl", "tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds, "peak_gib": _peak_gib(),
              "built_gib": built}
    del trainer, model
    return result


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", default="kimitune,trl")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--reply", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ckpt", default="on", choices=("on", "off"),
                        help="recompute every decoder layer in the backward (TRL's default, gradient_checkpointing)")
    parser.add_argument("--work", default="/tmp/dpo_gpu")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: checks the script only")
    args = parser.parse_args()
    if args.smoke:
        DEVICE = "cpu"
        args.pairs, args.prompt, args.reply, args.warmup, args.steps = 2, 16, 8, 1, 2
    tokenizer_dir = os.path.join(os.path.dirname(__file__), "..", "examples", "tokenizer")
    cfg = model_config(args.layers, "tiny" if args.smoke else "kimi-linear-48b-a3b")
    state = lora_peers.random_state(cfg, torch.bfloat16 if DEVICE == "cuda" else torch.float32, DEVICE)
    examples = random_pairs(args.pairs, args.prompt, args.reply, cfg.vocab_size)
    rows = []
    for tool in args.tools.split(","):
        if tool == "kimitune":
            rows.append(kimitune_row(cfg, state, examples, args.warmup, args.steps, args.ckpt == "on"))
        elif tool == "trl":
            rows.append(trl_row(cfg, state, examples, args.warmup, args.steps, tokenizer_dir, args.work,
                                args.ckpt == "on"))
        else:
            raise SystemExit(f"unknown tool {tool!r}: kimitune or trl")
        rows[-1].update(pairs=args.pairs, prompt=args.prompt, reply=args.reply, layers=args.layers, ckpt=args.ckpt)
        print(json.dumps(rows[-1]), flush=True)
    print("\n| tool | pairs x (prompt + 2 replies) | recompute | tokens/s | step ms | peak GiB | peak above the built "
          "model GiB |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tool']} | {args.pairs} x ({args.prompt} + 2 x {args.reply}) | {args.ckpt} "
              f"| {row['tokens_per_s'] / 1e3:.1f}k | {row['step_ms']:.0f} | {row['peak_gib']:.1f} "
              f"| {row['peak_gib'] - row['built_gib']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
