"""`kimitune train` itself, timed: the product's tokens/s beside train_gpu.py's row of the same model and length.

It writes what a user brings: a release-layout model folder with random bf16 weights at Kimi-Linear-48B-A3B's widths
and ``--layers`` layers (train_gpu.py's model), a chat dataset whose rows tokenise to about ``--seq`` tokens each
(random words from the shipped tokenizer's vocabulary: the real tokenizer cannot be downloaded here; the token ids
change nothing of the speed), and a YAML config (LoRA r=16, alpha=32, all-linear, sample packing, one
``--seq``-token row per step, no evaluation, no checkpoints). Then it runs ``python -m kimitune train`` as a user
would, reads the run's metrics.jsonl and reports the median tokens/s of its logging windows after ``--skip`` steps
(the first steps compile and tune kernels).

    python benchmarks/train_product.py --work /tmp/product                 # H100/H200: 4 layers, 4096 tokens
    python benchmarks/train_gpu.py --rows kimitune --seq 4096 --ckpt off    # the row it is held against (<= 5%)
    python benchmarks/train_product.py --smoke --work /tmp/product-smoke   # tiny model on the CPU: the script only
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "tokenizer"


def write_model(folder: Path, layers: int, preset: str, device: str) -> None:
    """A release-layout folder with random weights (kimitune's initialisation, seed 0) in bf16."""
    from train_gpu import model_config  # benchmarks/train_gpu.py: the same 4-layer model

    from kimitune.model import KimiLinearForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16 directly
    try:
        with torch.device(device):
            model = KimiLinearForCausalLM(model_config(layers, preset))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)


def write_dataset(path: Path, rows: int, tokens: int) -> None:
    """``rows`` chats (a short user turn, a long assistant reply of random words) of about ``tokens`` tokens each
    under the chat template, never more."""
    from kimitune.data import load_tokenizer, tokenize_conversation

    tokenizer = load_tokenizer(str(TOKENIZER))
    measure = lambda messages: len(tokenize_conversation(tokenizer, messages)["input_ids"])  # noqa: E731
    words = [w for w in (tokenizer.decode([i]) for i in range(len(tokenizer))) if re.fullmatch(r" ?[a-z]{2,}", w)]
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            reply = "".join(rng.choice(words) for _ in range(tokens))
            messages = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": reply}]
            length = measure(messages)
            while length > tokens:  # cut the reply by the share it is too long, then check again
                reply = reply[: int(len(reply) * tokens / length * 0.995)]
                messages[1]["content"] = reply
                length = measure(messages)
            f.write(json.dumps({"messages": messages}) + "\n")


def write_config(path: Path, model: Path, data: Path, output_dir: Path, seq: int, steps: int, logging: int,
                 device: str) -> None:
    config = {
        "base_model": str(model),
        "tokenizer": str(TOKENIZER),
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "sequence_len": seq,
        "sample_packing": True,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_linear": True,
        "learning_rate": 1e-4,
        "max_steps": steps,
        "logging_steps": logging,
        "save_steps": None,
        "output_dir": str(output_dir),
        "device": device,
        "seed": 0,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, data, config and the run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the figure (compilation, tuning)")
    parser.add_argument("--logging", type=int, default=5, help="logging_steps: one tokens/s window each")
    parser.add_argument("--json", default=None, help="also write the row here")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: checks the script only")
    args = parser.parse_args()
    if args.smoke:
        args.seq, args.steps, args.skip, args.logging = min(args.seq, 256), min(args.steps, 4), 1, 1
    device = "cpu" if args.smoke else "cuda"
    args.work.mkdir(parents=True, exist_ok=True)
    model, data = args.work / "model", args.work / "data.jsonl"
    start = time.perf_counter()
    write_model(model, args.layers, "tiny" if args.smoke else "kimi-linear-48b-a3b", device)
    write_dataset(data, args.steps + 2, args.seq)
    print(f"model and data written in {time.perf_counter() - start:.0f} s", flush=True)
    run_dir = args.work / f"run-{time.strftime('%H%M%S')}"
    config = args.work / "train.yaml"
    write_config(config, model, data, run_dir, args.seq, args.steps, args.logging, device)

    start = time.perf_counter()
    # The run's own output passes through: its log (and fla's tuning lines, with TRITON_PRINT_AUTOTUNING=1) is
    # what a user sees.
    finished = subprocess.run([sys.executable, "-m", "kimitune", "train", str(config)], cwd=ROOT)
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        sys.exit(f"kimitune train failed ({finished.returncode}): its output is above")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_s" in r and r["step"] - args.logging >= args.skip]
    row = {
        "tool": "kimitune train", "seq": args.seq, "layers": args.layers, "steps": args.steps,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
        "windows": [round(r["tokens_per_s"]) for r in windows], "wall_s": wall,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    print(json.dumps(row), flush=True)
    print(f"\n| tool | seq | tokens/s (median of {len(windows)} windows after step {args.skip}) | whole run s |\n"
          f"|---|---|---|---|\n| kimitune train | {args.seq} | {row['tokens_per_s'] / 1e3:.1f}k | {wall:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([row], indent=1))


if __name__ == "__main__":
    main()
