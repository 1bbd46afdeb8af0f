"""Writes the DPO quickstart pairs: key=value recall where the chosen reply is right and the rejected one is not.

Each row is in the ``chat_template.default`` layout: ``messages`` (the prompt), ``chosen`` and ``rejected`` (one
assistant message each). The prompt is a quickstart conversation (``scripts/make_quickstart_data.py``: a system
prompt, a first user turn listing one to three ``key=value`` pairs and asking one key, then one turn per other key)
up to its last question, its earlier answers included. The chosen reply answers the last question with the key's
value (``key=value``); the rejected one names the same key with a value that appears nowhere in the prompt. So the
preference is checkable from the prompt alone, and a model ranks the pair right as soon as it prefers a value it has
seen in the conversation: the tiny model learns that within a couple of minutes of CPU training.

Deterministic: the same seed writes the same bytes.

    python scripts/make_dpo_data.py [--out examples/data] [--train 400] [--eval 60] [--seed 0]
"""

from __future__ import annotations

import json
import random

from make_quickstart_data import KEYS, SYSTEM_PROMPTS, VALUES, write_splits  # scripts/, beside this one

MIN_PAIRS, MAX_PAIRS = 1, 3  # at most 3 of the 6 values in a prompt: a value it lacks is always left to reject


def make_pair(rng: random.Random) -> dict:
    """One row: ``{"messages": [system, user, (assistant, user)...], "chosen": {...}, "rejected": {...}}``."""
    num_pairs = rng.randint(MIN_PAIRS, MAX_PAIRS)
    keys = rng.sample(KEYS, num_pairs)
    values = {key: rng.choice(VALUES) for key in keys}
    asked = rng.sample(keys, num_pairs)  # every key once, in a random order; the last one is the preference's
    pairs = ";".join(f"{key}={values[key]}" for key in keys)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
    for turn, key in enumerate(asked):
        messages.append({"role": "user", "content": f"Remember:\n{pairs}\n{key}?" if turn == 0 else f"{key}?"})
        if turn < num_pairs - 1:
            messages.append({"role": "assistant", "content": f"{key}={values[key]}"})
    key = asked[-1]
    wrong = rng.choice([value for value in VALUES if value not in values.values()])
    return {
        "messages": messages,
        "chosen": {"role": "assistant", "content": f"{key}={values[key]}"},
        "rejected": {"role": "assistant", "content": f"{key}={wrong}"},
    }


if __name__ == "__main__":
    write_splits(make_pair, lambda row: json.dumps(row["messages"]), __doc__, "dpo", 400, 60, "pairs")
