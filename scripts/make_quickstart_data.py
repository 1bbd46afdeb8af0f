"""Writes the quickstart chat data: multi-key associative recall, checkable by exact match.

Each conversation has a system prompt, a first user turn that lists one to five ``key=value`` pairs and asks for
one key (``key?``), and further user turns that ask for every other key, one per turn, in a random order. The
assistant answers ``key=value``, so every assistant message is its own reference answer: exact-match accuracy on the
eval file is the fraction of assistant turns a model reproduces exactly. Keys (12) and values (6) come from small word lists, and one-pair conversations
(copy the only value) lead into the harder ones, so that the tiny model (vocabulary 1024) learns the task within a
few hundred steps on a CPU (benchmarks/RESULTS.md, issue 4).

The layout is chosen for a KDA model. Every key appears as the same token (never after a space: pairs are joined
by ``;`` and each question starts its message), and the answer repeats the key before ``=``: at that ``=`` the short
convolution sees ``key =``, exactly what it saw just before the value in the list of pairs, so one delta-rule
layer can bind ``key =`` to the value when reading the list and retrieve it when answering.

Deterministic: the same seed writes the same bytes.

    python scripts/make_quickstart_data.py [--out examples/data] [--train 1600] [--eval 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

KEYS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "ant", "elk", "ram", "yak")
VALUES = ("red", "blue", "green", "gold", "pink", "gray")
SYSTEM_PROMPTS = (
    "Recall the value of each key.",
    "You remember key=value pairs.",
    "Answer each key with its value.",
)
MIN_PAIRS, MAX_PAIRS = 1, 5


def make_conversation(rng: random.Random) -> dict:
    """One row: ``{"messages": [system, user, assistant, user, assistant, ...]}``."""
    num_pairs = rng.randint(MIN_PAIRS, MAX_PAIRS)
    keys = rng.sample(KEYS, num_pairs)
    values = {key: rng.choice(VALUES) for key in keys}
    asked = rng.sample(keys, num_pairs)  # every key once, in a random order
    pairs = ";".join(f"{key}={values[key]}" for key in keys)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
    for turn, key in enumerate(asked):
        user = f"Remember:\n{pairs}\n{key}?" if turn == 0 else f"{key}?"
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": f"{key}={values[key]}"})
    return {"messages": messages}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))


def write_splits(make_row: Callable[[random.Random], dict], identity: Callable[[dict], str], doc: str, prefix: str,
                 train: int, evaluation: int, what: str) -> None:
    """The command line of a data script: writes ``<prefix>_train.jsonl`` and ``<prefix>_eval.jsonl`` (``--train``
    and ``--eval`` rows of ``make_row``) to ``--out``, no eval row sharing its ``identity`` with a training row."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "data")
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--eval", type=int, default=evaluation)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Separate streams so that changing --train leaves the eval file as it was.
    stream = "" if prefix == "quickstart" else f"{prefix}-"
    train_rng, eval_rng = random.Random(f"{args.seed}-{stream}train"), random.Random(f"{args.seed}-{stream}eval")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [make_row(train_rng) for _ in range(args.train)]
    # Short rows repeat by chance; eval holds none seen in training, so it measures what was learnt, not recalled.
    seen = {identity(row) for row in rows}
    held_out: list[dict] = []
    while len(held_out) < args.eval:
        row = make_row(eval_rng)
        if identity(row) not in seen:
            seen.add(identity(row))
            held_out.append(row)
    write_jsonl(args.out / f"{prefix}_train.jsonl", rows)
    write_jsonl(args.out / f"{prefix}_eval.jsonl", held_out)
    print(f"wrote {args.train} train and {args.eval} eval {what} to {args.out}")


if __name__ == "__main__":
    write_splits(make_conversation, json.dumps, __doc__, "quickstart", 1600, 200, "conversations")
