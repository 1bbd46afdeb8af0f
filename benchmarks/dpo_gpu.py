"""DPO with LoRA on one GPU: kimitune against TRL's DPOTrainer + PEFT, same weights, same pairs, same run (issue 26).

The model is train_gpu.py's: Kimi-Linear-48B-A3B's widths with ``--layers`` layers, random bf16 weights. Both tools
train LoRA (r=16, alpha=32, all-linear) with AdamW, beta 0.1, on ``--pairs`` pairs a step of random tokens: a
``--prompt``-token prompt, and chosen and rejected replies of ``--reply`` tokens each.

- kimitune: the pairs packed into one row (both sequences of every pair, ``cu_seqlens``), the reference
  log-probabilities computed once before the timed steps (``kimitune.train.preference.reference_log_probs``: the
  model as it starts), ``TrainStep`` with the ``PreferenceObjective``: what `kimitune train` with ``rl: dpo`` runs.
- TRL 1.16: ``DPOTrainer`` on transformers' ``KimiLinearForCausalLM`` with PEFT's LoRA (the reference is the model
  with its adapter disabled, computed every step, TRL's default), the same pairs pre-tokenised, padded per batch.

kimitune's settings, ``--kimitune SPEC[,SPEC...]`` (one row each, in one process, TRL's row once; a spec joins
these with ``+``; ``whole``: none of them):

- ``piece=N``: the recomputed layers (and the reference pass, without gradients) computed in pieces of ``N``
  tokens along the packed row (``RunOptions.sequence_piece_len``, kimitune.model.pieces): activations then grow
  with ``N``, not the row's length. Needs ``--ckpt on`` (the pieces are what recomputes). TRL runs its layers whole.
- ``tiled`` or ``tiled=N``: every layer's MLP / MoE in shards of tokens (N, or Axolotl's default of about
  hidden_size tokens a shard), each recomputed in the backward (``RunOptions.mlp_shards``, kimitune.model.tiled_mlp).
- ``shared``: each pair's prompt computed once, both replies continued from its states (``rl_shared_prompt``,
  kimitune.model.shared_prompts); tokens/s still counts the pairs' whole sequences. TRL runs its pairs whole.

and for every row of kimitune's:

- ``--quant int8|fp8|nf4``: the frozen weights quantised (``kimitune.quant.quantize_model_``, before LoRA), bf16
  compute; TRL is then left out (a note says so).
- ``--layers 27``: the whole 48B, built straight on the GPU in bf16 or quantised form, one layer at a time
  (train_48b.py's ``build``: no CPU state dict, which at 48B would be too slow and too big); TRL would not fit.

Tokens/s counts the tokens of both sequences of every pair (no padding) over the timed steps; peak is the GPU's
(kimitune's measured from the built model on: the build's own transients left out; its JSON row also gives the
reference pass's peak and the timed steps' apart).

    python benchmarks/dpo_gpu.py                         # both tools, 4 layers
    python benchmarks/dpo_gpu.py --tools kimitune --pairs 8 --prompt 1024 --reply 512
    python benchmarks/dpo_gpu.py --pairs 8 --prompt 1024 --reply 512 --kimitune whole,shared+tiled,piece=2048
    python benchmarks/dpo_gpu.py --tools kimitune --quant int8 --pairs 8 --prompt 1024 --reply 512
    python benchmarks/dpo_gpu.py --tools kimitune --layers 27 --pairs 4 --prompt 1024 --reply 512   # the whole 48B
    python benchmarks/dpo_gpu.py --tools kimitune --layers 27 --quant nf4 --pairs 4 --prompt 1024 --reply 512
    python benchmarks/dpo_gpu.py --smoke                 # tiny preset on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass, replace

import torch

import lora_peers  # benchmarks/lora_peers.py: the LoRA set-ups shared with train_gpu.py
from train_gpu import model_config

DEVICE = "cuda"
WHOLE_48B = 27  # --layers: the 48B's own depth, built as train_48b.py builds it


@dataclass(frozen=True)
class Setting:
    """One kimitune row's settings: ``--kimitune``'s spec (``whole``, or ``piece=N``, ``tiled[=N]``, ``shared``
    joined by ``+``)."""

    piece: int | None = None  # RunOptions.sequence_piece_len
    mlp_shards: int | None = 1  # RunOptions.mlp_shards: 1 whole blocks, None about hidden_size tokens a shard
    shared_prompt: bool = False
    name: str = "whole"

    @classmethod
    def parse(cls, spec: str) -> Setting:
        piece, shards, shared = None, 1, False
        for part in spec.split("+"):
            name, _, value = part.partition("=")
            if name == "whole" and not value:
                continue
            if name == "piece" and value.isdigit() and int(value) > 0:
                piece = int(value)
            elif name == "tiled" and (not value or value.isdigit() and int(value) > 0):
                shards = int(value) if value else None
            elif name == "shared" and not value:
                shared = True
            else:
                raise ValueError(f"--kimitune: {part!r} in {spec!r} is none of whole, piece=N, tiled, tiled=N, shared")
        return cls(piece, shards, shared, spec)


def random_pairs(pairs: int, prompt: int, reply: int, vocab: int, seed: int = 1) -> list[dict]:
    """``pairs`` of random token ids (below the vocabulary's last 64 ids, where the special tokens are)."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, vocab - 64, (n,), generator=generator).tolist()  # noqa: E731
    return [{"prompt_ids": draw(prompt), "chosen_ids": draw(reply), "rejected_ids": draw(reply)}
            for _ in range(pairs)]


def packed_batch(examples: list[dict], shared_prompt: bool = False):
    """The pairs as kimitune's ``PreferenceBatch``: one row, pair k's chosen at sequence 2k, its rejected at 2k + 1;
    ``shared_prompt``: each prompt once (``rl_shared_prompt``, kimitune.data.preference.make_preference_batches).
    ``num_tokens`` is the pairs' whole sequences' either way, so that tokens/s compares with the other rows."""
    import numpy as np

    from kimitune.data.packing import Sample
    from kimitune.data.preference import PreferenceBatch, PreferencePair, make_preference_batches

    if shared_prompt:
        pairs = [PreferencePair(*(Sample(np.array(e["prompt_ids"] + r, dtype=np.int32),
                                         np.array([-100] * len(e["prompt_ids"]) + r, dtype=np.int32))
                                  for r in (e["chosen_ids"], e["rejected_ids"]))) for e in examples]
        (batch,) = make_preference_batches(pairs, 1 << 30, seed=0, epoch=0, shared_prompts=True)
        batch.num_tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                               for e in examples)
        return batch
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


_STARTED = time.perf_counter()


def _say(message: str) -> None:
    """A progress line with the seconds since the start: a run stopped by a time limit still tells how far it got
    (a fresh GPU's first steps compile and autotune for minutes)."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", flush=True)


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


def build_kimitune(cfg, state, ckpt: bool, quant: str | None, piece: int | None, mlp_shards: int | None = 1):
    """kimitune's model with LoRA and the ``RunOptions`` its passes run with. ``state`` None: the whole 48B, built on
    the device by train_48b.py's ``build`` (bf16, or ``quant``'s form, layer by layer); otherwise from ``state``
    (the weights TRL's row gets too) by lora_peers.build_kimitune, its frozen weights quantised by ``quant`` before
    LoRA goes on."""
    from kimitune.model import RunOptions

    if state is None:
        from kimitune.quant import QuantSpec
        from train_48b import build  # benchmarks/train_48b.py

        model, _ = build(cfg, QuantSpec.parse(quant) if quant else None, DEVICE,
                         torch.bfloat16 if DEVICE == "cuda" else torch.float32, experts=False)
        options = RunOptions(recompute_layers=model.recomputed_layers() if ckpt else frozenset())
    else:  # quantize_model_ runs there before apply_lora
        model, _, options = lora_peers.build_kimitune(cfg, state, DEVICE, ckpt=ckpt, quant=quant)
    return model, replace(options, sequence_piece_len=piece, mlp_shards=mlp_shards)


def kimitune_row(cfg, state, examples, warmup: int, steps: int, ckpt: bool, quant: str | None = None,
                 setting: Setting | None = None) -> dict:
    from kimitune.train.preference import PreferenceObjective, PreferenceSettings, reference_log_probs
    from kimitune.train.step import TrainStep

    setting = setting or Setting()
    _fresh()
    model, options = build_kimitune(cfg, state, ckpt, quant, setting.piece, setting.mlp_shards)
    _fresh()  # the peak from the built model on: a quantising build's bf16 transients are not the step's
    built = _allocated_gib()
    batch = packed_batch(examples, setting.shared_prompt)
    _say(f"kimitune {setting.name}: built")
    reference = reference_log_probs(model, [batch], len(examples), DEVICE, options)
    _say(f"kimitune {setting.name}: reference log-probabilities")
    reference_peak = _peak_gib()  # the pass without gradients runs its layers whole (or in pieces)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, torch.optim.AdamW(params, lr=1e-5, fused=DEVICE == "cuda"), DEVICE, options=options,
                     max_grad_norm=1.0, objective=PreferenceObjective(PreferenceSettings("dpo", beta=0.1), reference))
    counts = step.objective.denominator([batch])
    losses = []
    for i in range(warmup):
        losses.append(step([batch], counts).loss)
        _say(f"kimitune {setting.name}: warm-up step {i + 1} done")
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step([batch], counts).loss)
    _sync()
    seconds = (time.perf_counter() - start) / steps
    result = {"tool": "kimitune", "tokens_per_s": batch.num_tokens / seconds, "step_ms": 1e3 * seconds,
              "peak_gib": max(reference_peak, _peak_gib()), "built_gib": built, "first_loss": losses[0].item(),
              "reference_peak_gib": reference_peak, "steps_peak_gib": _peak_gib(), "setting": setting.name}
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
    # transformers' Kimi Linear runs fla's kernels too: they start from the same tuned configs as kimitune's
    from kimitune.ops.tuned_kernels import seed_after_import

    seed_after_import()
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
            _say(f"trl: step {len(marks)} done")

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
    parser.add_argument("--layers", type=int, default=4,
                        help=f"decoder layers at the 48B's widths; {WHOLE_48B}: the whole 48B (kimitune only)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--reply", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ckpt", default="on", choices=("on", "off"),
                        help="recompute every decoder layer in the backward (TRL's default, gradient_checkpointing)")
    parser.add_argument("--quant", default=None, choices=("int8", "fp8", "nf4"),
                        help="kimitune: quantise the frozen weights (before LoRA); TRL's row is then left out")
    parser.add_argument("--kimitune", default="whole",
                        help="kimitune's rows, comma-separated: whole, or piece=N, tiled[=N], shared joined by +")
    parser.add_argument("--work", default="/tmp/dpo_gpu")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: checks the script only")
    args = parser.parse_args()
    tools = args.tools.split(",")
    try:
        settings = [Setting.parse(spec) for spec in args.kimitune.split(",")]
    except ValueError as error:
        parser.error(str(error))
    if any(setting.piece for setting in settings) and args.ckpt != "on":
        parser.error("piece=N needs --ckpt on: the pieces are what recomputes (kimitune's sequence_piece_len)")
    if args.layers == WHOLE_48B and "trl" in tools:
        parser.error(f"--layers {WHOLE_48B} is the whole 48B, kimitune only (TRL's bf16 model and its per-step "
                     "reference would not fit): pass --tools kimitune")
    if args.quant and "trl" in tools:
        print(f"note: --quant {args.quant} quantises kimitune's frozen weights only; TRL's bf16 row would not be "
              "like for like, so it is left out", flush=True)
        tools = [tool for tool in tools if tool != "trl"]
        if not tools:
            parser.error("--quant leaves no tool to run: pass --tools kimitune")
    if args.smoke:
        DEVICE = "cpu"
        args.pairs, args.prompt, args.reply, args.warmup, args.steps = 2, 16, 8, 1, 2
    tokenizer_dir = os.path.join(os.path.dirname(__file__), "..", "examples", "tokenizer")
    cfg = model_config(args.layers, "tiny" if args.smoke else "kimi-linear-48b-a3b")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    # The whole 48B is built on the device by kimitune_row itself: no state dict on the CPU.
    state = None if args.layers == WHOLE_48B else lora_peers.random_state(cfg, dtype, DEVICE)
    _say("weights drawn")
    examples = random_pairs(args.pairs, args.prompt, args.reply, cfg.vocab_size)
    unquantised = "bf16" if dtype == torch.bfloat16 else "fp32"
    rows = []
    common = dict(pairs=args.pairs, prompt=args.prompt, reply=args.reply, layers=args.layers, ckpt=args.ckpt)
    for tool in tools:
        if tool == "kimitune":
            for setting in settings:
                rows.append(kimitune_row(cfg, state, examples, args.warmup, args.steps, args.ckpt == "on",
                                         args.quant, setting))
                rows[-1].update(common, weights=args.quant or unquantised)
                print(json.dumps(rows[-1]), flush=True)
        elif tool == "trl":
            rows.append(trl_row(cfg, state, examples, args.warmup, args.steps, tokenizer_dir, args.work,
                                args.ckpt == "on"))
            rows[-1].update(common, setting="whole", weights=unquantised)
            print(json.dumps(rows[-1]), flush=True)
        else:
            raise SystemExit(f"unknown tool {tool!r}: kimitune or trl")
    print("\n| tool | layers | weights | pairs x (prompt + 2 replies) | recompute | setting | tokens/s | step ms "
          "| peak GiB | peak above the built model GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tool']} | {row['layers']} | {row['weights']} | {args.pairs} x ({args.prompt} + 2 x "
              f"{args.reply}) | {args.ckpt} | {row['setting']} | {row['tokens_per_s'] / 1e3:.1f}k "
              f"| {row['step_ms']:.0f} | {row['peak_gib']:.1f} | {row['peak_gib'] - row['built_gib']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
