"""Preprocessing speed of one very long chat: a user turn of ``--words`` random words from the shipped tokenizer's
vocabulary, an assistant reply a tenth as long, then a second short exchange, through kimitune's chat tokenisation
(the chat template, the per-message label masks). Prints the tokens, the seconds and tokens/s.

    python benchmarks/long_data.py --words 400000      # about 1.4M tokens
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from kimitune.data import load_tokenizer, tokenize_conversation

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=400000)
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(ROOT / "examples" / "tokenizer"))
    words = [w for w in tokenizer.get_vocab() if w.isalpha()][:2000]
    rng = random.Random(0)
    user = " ".join(rng.choice(words) for _ in range(args.words))
    reply = " ".join(rng.choice(words) for _ in range(args.words // 10))
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": reply}]
    start = time.perf_counter()
    tokens = tokenize_conversation(tokenizer, messages)
    seconds = time.perf_counter() - start
    total = len(tokens["input_ids"])
    trained = sum(label != -100 for label in tokens["labels"])
    print(f"{total:,} tokens ({trained:,} trained) in {seconds:.2f} s: {total / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
