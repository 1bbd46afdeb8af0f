"""Preference and KTO data: every row layout gives the same pair, prompts are masked exactly and shared, bad rows
are counted where they are, and packing keeps each pair whole and side by side."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from data_helpers import DATA_DIR, REPO, TOKENIZER_DIR, expected_labels
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.progress import Progress

from kimitune.config import DatasetConfig
from kimitune.data import IGNORE_INDEX, ConversationError, DataError, Sample, load_tokenizer
from kimitune.data.preference import (
    PREFERENCE_TYPES,
    UNPAIRED_TYPES,
    PreferencePair,
    UnpairedSample,
    make_preference_batches,
    make_unpaired_batches,
    pairs_to_samples,
    row_to_preference,
    row_to_unpaired,
    samples_to_pairs,
    tokenize_pair,
    tokenize_preference_rows,
    tokenize_reply,
    tokenize_unpaired_rows,
    with_kl_sequences,
)

SYSTEM = {"role": "system", "content": "Recall the value of each key."}
USER = {"role": "user", "content": "Remember:\ncat=red\ncat?"}
CHOSEN = {"role": "assistant", "content": "cat=red"}
REJECTED = {"role": "assistant", "content": "cat=blue"}
PROMPT = [SYSTEM, USER]
STRINGS = {"system": SYSTEM["content"], "chosen": CHOSEN["content"], "rejected": REJECTED["content"]}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# (type, row, extra DatasetConfig settings, extra keyword arguments): each one is PROMPT, CHOSEN, REJECTED.
LAYOUTS = [
    ("chat_template.default", {"messages": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, {}, {}),
    ("chat_template", {"messages": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, {}, {}),
    ("chat_template.default", {"chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT, REJECTED]}, {}, {}),
    ("chat_template.default", {"messages": PROMPT, "chosen": [USER, CHOSEN], "rejected": [REJECTED]}, {}, {}),
    ("chat_template.default", {"messages": PROMPT, "chosen": "cat=red", "rejected": "cat=blue"}, {}, {}),
    (
        "chat_template.default",
        {"conversations": [{"from": "system", "value": SYSTEM["content"]}, {"from": "human", "value": USER["content"]}],
         "better": {"from": "gpt", "value": "cat=red"}, "worse": {"from": "bot", "value": "cat=blue"}},
        {"field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"},
         "roles": {"user": ["human"], "assistant": ["gpt", "bot"], "system": ["system"]}},
        {"field_chosen": "better", "field_rejected": "worse"},
    ),
    *[(f"{p}.argilla_chat", {"chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT, REJECTED]}, {}, {})
      for p in ("chatml", "llama3", "chat_template")],
    *[(f"{p}.prompt_pairs", {**STRINGS, "prompt": USER["content"]}, {}, {}) for p in ("chatml", "llama3")],
    *[(f"{p}.intel", {**STRINGS, "question": USER["content"]}, {}, {}) for p in ("chatml", "llama3")],
    *[(f"{p}.icr", {**STRINGS, "input": USER["content"]}, {}, {}) for p in ("chatml", "llama3")],
    *[(f"{p}.argilla", {"system": SYSTEM["content"], "instruction": USER["content"],
                        "chosen_response": "cat=red", "rejected_response": "cat=blue"}, {}, {})
      for p in ("chatml", "llama3")],
    *[(f"{p}.ultra", {"system": SYSTEM["content"], "prompt": USER["content"], "chosen": [USER, CHOSEN],
                      "rejected": [USER, REJECTED]}, {}, {}) for p in ("chatml", "llama3")],
    ("chat_template.argilla", {"system": SYSTEM["content"], "chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]},
     {}, {}),
    ("chat_template.argilla", {"system": SYSTEM["content"], "prompt": USER["content"], "chosen": [USER, CHOSEN],
                               "rejected": [REJECTED]}, {}, {}),
]


@pytest.mark.parametrize(("dataset_type", "row", "settings", "kwargs"), LAYOUTS)
def test_every_layout_gives_the_same_pair(tokenizer, tmp_path, dataset_type, row, settings, kwargs):
    config = DatasetConfig(path=str(tmp_path / "pairs.jsonl"), **settings)
    assert row_to_preference(row, dataset_type, config, "row 1", **kwargs) == (PROMPT, CHOSEN, REJECTED)
    write_jsonl(tmp_path / "pairs.jsonl", [row])
    (pair,), report = tokenize_preference_rows(config, tokenizer, 256, dataset_type, **kwargs)
    expected = tokenize_pair(tokenizer, PROMPT, CHOSEN, REJECTED)
    for got, want in ((pair.chosen, expected.chosen), (pair.rejected, expected.rejected)):
        assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)
    assert (report.rows, report.kept, report.skipped) == (1, 1, {})
    assert report.tokens == len(pair.chosen) + len(pair.rejected)


def trained_tokens(tokenizer, sample):
    return tokenizer.convert_ids_to_tokens([int(t) for t, label in zip(sample.input_ids, sample.labels) if label >= 0])


def test_multi_turn_prompt_is_masked_exactly(tokenizer):
    # The earlier answer is the reply's very text, and carries flags that would train it: it stays masked.
    prompt = [SYSTEM, {"role": "user", "content": "Remember:\ncat=red;dog=blue\ndog?"},
              {"role": "assistant", "content": "dog=blue", "train": True},
              {"role": "user", "content": "cat?", "weight": 1}]
    pair = tokenize_pair(tokenizer, prompt, CHOSEN, REJECTED)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
    for sample, reply in ((pair.chosen, CHOSEN), (pair.rejected, REJECTED)):
        unflagged = [{"role": m["role"], "content": m["content"]} for m in prompt]
        assert sample.input_ids.tolist() == tokenizer.apply_chat_template([*unflagged, reply])["input_ids"]
        assert sample.input_ids.dtype == sample.labels.dtype == np.int32
        # Independent reference: the hand-written renderer's character spans, the prompt flagged untrained.
        masked = [{**m, "train": False, "weight": 0} for m in unflagged]
        _, ids, labels = expected_labels(tokenizer, [*masked, reply], ("assistant",), "turn")
        assert sample.labels.tolist() == labels
        # Every prompt token masked, every reply token trained and equal to the reply's tokens.
        n = len(prompt_ids)
        assert sample.input_ids[:n].tolist() == prompt_ids and (sample.labels[:n] == IGNORE_INDEX).all()
        assert sample.labels[n:].tolist() == sample.input_ids[n:].tolist()
        assert sample.input_ids[n:].tolist() == tokenizer.encode(reply["content"] + "<|im_end|>")
    assert trained_tokens(tokenizer, pair.chosen) == ["cat", "=", "red", "<|im_end|>"]
    assert trained_tokens(tokenizer, pair.rejected) == ["cat", "=", "blue", "<|im_end|>"]


def test_train_on_eos_none_leaves_the_end_of_turn_untrained(tokenizer):
    sample = tokenize_reply(tokenizer, PROMPT, CHOSEN, train_on_eos="none")
    assert trained_tokens(tokenizer, sample) == ["cat", "=", "red"]


def test_a_reply_that_merges_into_its_prompt_is_refused(tokenizer):
    # Without special tokens around the reply, " key" is one token: the chosen sequence's prompt tokens end
    # differently from the rejected one's, so the pair has no common prompt.
    plain = load_tokenizer(str(TOKENIZER_DIR), chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                                                             "{% endfor %}")
    with pytest.raises(ConversationError, match="chosen and rejected prompt tokens differ"):
        tokenize_pair(plain, [USER], {"role": "assistant", "content": "key=red"}, CHOSEN)
    assert tokenize_pair(plain, [USER], CHOSEN, REJECTED).chosen.labels[0] == IGNORE_INDEX


def test_bad_rows_are_counted_by_reason_with_their_lines(tokenizer, tmp_path):
    good = {"messages": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    rows = [
        good,                                                                         # line 1
        "{not json",                                                                  # line 2
        {"messages": PROMPT, "rejected": REJECTED},                                   # line 3
        {"chosen": CHOSEN, "rejected": REJECTED},                                     # line 4
        {"messages": PROMPT, "chosen": 5, "rejected": REJECTED},                      # line 5
        {"messages": PROMPT, "chosen": {"role": "assistant", "content": " "}, "rejected": REJECTED},  # line 6
        {"messages": PROMPT, "chosen": {"role": "user", "content": "x"}, "rejected": REJECTED},      # line 7
        {"messages": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN},                   # line 8
        {"messages": [{"role": "user", "content": "word " * 100}], "chosen": CHOSEN, "rejected": REJECTED},  # 9
        "",                                                                           # line 10: blank, not a row
        {"messages": PROMPT, "chosen": [{"role": "user", "content": "other"}, CHOSEN], "rejected": REJECTED},  # 11
        {"messages": [{"role": "robot", "content": "x"}], "chosen": CHOSEN, "rejected": REJECTED},  # line 12
        {"messages": [], "chosen": CHOSEN, "rejected": REJECTED},                     # line 13
        {**good, "chosen": {**CHOSEN, "score": 9}},                                   # line 14
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with Progress(disable=True) as progress:
        pairs, report = tokenize_preference_rows(DatasetConfig(path=str(path)), tokenizer, 128, progress=progress)
        assert progress.tasks[0].completed == 13
    where = lambda *lines: [f"{path} line {n}" for n in lines]  # noqa: E731
    assert (report.rows, report.kept, len(pairs)) == (13, 2, 2)
    assert report.ignored_keys["message key 'score'"].examples == where(14)
    assert {reason: (t.count, t.examples) for reason, t in report.skipped.items()} == {
        "not valid JSON": (1, where(2)),
        "missing chosen field": (1, where(3)),
        "missing messages field": (1, where(4)),
        "chosen is not a string or messages": (1, where(5)),
        "empty chosen": (1, where(6)),
        "chosen does not end in an assistant message": (1, where(7)),
        "chosen and rejected are the same": (1, where(8)),
        "chosen + rejected longer than sequence_len (128)": (1, where(9)),
        "chosen disagrees with the prompt": (1, where(11)),
        "unknown role": (1, where(12)),
        "empty prompt": (1, where(13)),
    }


def test_argilla_chat_prompts_must_match(tokenizer, tmp_path):
    rows = [{"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]},
            {"chosen": [USER, CHOSEN], "rejected": [{"role": "user", "content": "dog?"}, REJECTED]},
            {"chosen": [CHOSEN], "rejected": [REJECTED]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    _, report = tokenize_preference_rows(DatasetConfig(path=str(path)), tokenizer, 256, "chatml.argilla_chat")
    assert {r: t.examples for r, t in report.skipped.items()} == {
        "chosen and rejected prompts differ": [f"{path} line 2"], "empty prompt": [f"{path} line 3"],
    }
    with pytest.raises(ConversationError, match=r"prompts differ: somewhere line 7: "):
        row_to_preference(rows[1], "llama3.argilla_chat", DatasetConfig(path="x.jsonl"), "somewhere line 7")


def test_parquet_rows_are_numbered_from_one(tokenizer, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pyarrow.Table.from_pylist([
        {"prompt": "cat?", "chosen": "cat=red", "rejected": "cat=blue"},
        {"prompt": "cat?", "chosen": "", "rejected": "cat=blue"},
    ])
    pq.write_table(table, tmp_path / "pairs.parquet")
    pairs, report = tokenize_preference_rows(DatasetConfig(path=str(tmp_path / "pairs.parquet")), tokenizer, 256,
                                             "chatml.prompt_pairs")
    assert len(pairs) == 1 and report.skipped["empty chosen"].examples == [f"{tmp_path / 'pairs.parquet'} row 2"]


def test_unusable_settings_and_data_are_errors(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "cat?", "chosen": "cat=red"}])
    config = DatasetConfig(path=str(path))
    with pytest.raises(DataError, match="not a preference row format; supported: chat_template, ") as err:
        tokenize_preference_rows(config, tokenizer, 256, "chatml.nectar")
    assert all(name in str(err.value) for name in PREFERENCE_TYPES)
    with pytest.raises(DataError, match="not a KTO row format") as err:
        row_to_unpaired({}, "chatml.argilla_chat", config)
    assert all(name in str(err.value) for name in UNPAIRED_TYPES)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: no usable rows out of 1: 1 x missing rejected"):
        tokenize_preference_rows(config, tokenizer, 256, "chatml.prompt_pairs")
    with pytest.raises(DataError, match="message_property_mappings"):
        tokenize_preference_rows(DatasetConfig(path=str(path), message_property_mappings={"text": "x"}), tokenizer,
                                 256)


KTO_LAYOUTS = [
    ("chatml.prompt_pairs", {"system": SYSTEM["content"], "prompt": USER["content"], "completion": "cat=red"}),
    ("llama3.prompt_pairs", {"prompt": PROMPT, "completion": [CHOSEN]}),
    ("chatml.ultra", {"prompt": PROMPT, "completion": CHOSEN}),
    ("chatml.intel", {"system": SYSTEM["content"], "question": USER["content"], "completion": "cat=red"}),
    ("llama3.argilla", {"system": SYSTEM["content"], "instruction": USER["content"], "completion": "cat=red"}),
    ("chat_template.default", {"messages": PROMPT, "completion": CHOSEN}),
    ("chat_template", {"completion": [*PROMPT, CHOSEN]}),
]


@pytest.mark.parametrize(("dataset_type", "row"), KTO_LAYOUTS)
@pytest.mark.parametrize("label", [True, False])
def test_kto_rows(tokenizer, tmp_path, dataset_type, row, label):
    row = {**row, "label": label}
    config = DatasetConfig(path=str(tmp_path / "kto.jsonl"))
    assert row_to_unpaired(row, dataset_type, config, "row 1") == (PROMPT, CHOSEN, label)
    write_jsonl(tmp_path / "kto.jsonl", [row, {**row, "label": "yes"}, {k: v for k, v in row.items() if k != "label"}])
    (sample,), report = tokenize_unpaired_rows(config, tokenizer, 256, dataset_type)
    expected = tokenize_reply(tokenizer, PROMPT, CHOSEN)
    assert sample.desirable is label and np.array_equal(sample.sample.labels, expected.labels)
    assert {r: t.count for r, t in report.skipped.items()} == {"label is not true/false": 1, "missing label field": 1}


def numbered_pairs(lengths, seed=0):
    """Pairs whose tokens say which pair and side they are: id = 100 * pair + 10 * side + position % 10."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index, (chosen_len, rejected_len) in enumerate(lengths):
        sides = []
        for side, length in enumerate((chosen_len, rejected_len)):
            ids = (100 * index + 10 * side + np.arange(length) % 10).astype(np.int32)
            labels = np.where(np.arange(length) >= length // 2, ids, IGNORE_INDEX).astype(np.int32)
            sides.append(Sample(ids, labels))
        pairs.append(PreferencePair(*sides))
    return pairs


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=40),
    sequence_len=st.integers(80, 200),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 2),
)
def test_pairs_are_packed_whole_and_side_by_side(lengths, sequence_len, seed, epoch):
    pairs = numbered_pairs(lengths)
    batches = make_preference_batches(pairs, sequence_len, seed, epoch)
    seen = []
    for batch in batches:
        n = len(batch.pair_ids)
        assert batch.input_ids.shape == batch.labels.shape == (1, batch.num_tokens)
        assert batch.input_ids.dtype == batch.labels.dtype == torch.long
        assert batch.cu_seqlens.dtype == torch.int32 and batch.pair_ids.dtype == torch.int64
        assert batch.num_tokens <= sequence_len and batch.cu_seqlens.shape == (2 * n + 1,)
        cu = batch.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == batch.num_tokens
        for k, pair_id in enumerate(batch.pair_ids.tolist()):
            for side, sample in enumerate((pairs[pair_id].chosen, pairs[pair_id].rejected)):
                start, end = cu[2 * k + side], cu[2 * k + side + 1]
                assert batch.input_ids[0, start:end].tolist() == sample.input_ids.tolist()
                assert batch.labels[0, start:end].tolist() == sample.labels.tolist()
        assert batch.num_label_tokens == sum(
            int((batch.labels[0, a + 1 : b] != IGNORE_INDEX).sum()) for a, b in zip(cu, cu[1:])
        )
        seen += batch.pair_ids.tolist()
    assert sorted(seen) == list(range(len(pairs)))  # every pair once in the epoch


def test_packing_is_a_function_of_seed_and_epoch():
    pairs = numbered_pairs(np.random.default_rng(1).integers(5, 50, size=(200, 2)).tolist())
    layout = lambda seed, epoch: [(b.pair_ids.tolist(), b.input_ids.tolist())  # noqa: E731
                                  for b in make_preference_batches(pairs, 256, seed, epoch)]
    assert layout(3, 1) == layout(3, 1)
    assert layout(3, 2) != layout(3, 1) and layout(4, 1) != layout(3, 1)
    assert samples_to_pairs(pairs_to_samples(pairs)) == pairs


def test_too_long_pairs_and_no_pairs_are_refused():
    with pytest.raises(ValueError, match="pair 1 has 41 tokens > sequence_len 40"):
        make_preference_batches(numbered_pairs([(10, 10), (20, 21)]), 40, 0, 0)
    with pytest.raises(ValueError, match="no pairs"):
        make_preference_batches([], 40, 0, 0)


def test_unpaired_batches():
    pairs = numbered_pairs([(5, 7), (9, 3), (4, 4), (30, 1)])
    samples = [UnpairedSample(pair.chosen, desirable=i % 2 == 0) for i, pair in enumerate(pairs)]
    with pytest.raises(ValueError, match="KL sequences"):
        make_unpaired_batches(samples, 40, seed=0, epoch=0)
    samples = with_kl_sequences(samples, 40)
    batches = make_unpaired_batches(samples, 40, seed=0, epoch=0)
    seen = []
    for batch in batches:
        assert batch.desirable.dtype == torch.bool and batch.sample_ids.dtype == torch.int64
        assert batch.cu_seqlens.shape == (len(batch.sample_ids) + 1,) and batch.num_tokens <= 40
        cu, kl_cu = batch.cu_seqlens.tolist(), batch.kl.cu_seqlens.tolist()
        for k, (index, desirable) in enumerate(zip(batch.sample_ids.tolist(), batch.desirable.tolist())):
            assert batch.input_ids[0, cu[k] : cu[k + 1]].tolist() == samples[index].sample.input_ids.tolist()
            assert batch.kl.input_ids[0, kl_cu[k] : kl_cu[k + 1]].tolist() == samples[index].kl.input_ids.tolist()
            assert desirable == samples[index].desirable
            seen.append(index)
    assert sorted(seen) == [0, 1, 2, 3]


def test_a_kl_sequence_is_a_samples_prompt_and_the_previous_samples_reply():
    """TRL's pairing (x_1, y_n), (x_2, y_1), ...: prompt tokens unlabelled, the borrowed reply's labels kept."""
    def sample(prompt, reply):
        return Sample(np.array(prompt + reply, np.int32), np.array([-100] * len(prompt) + reply, np.int32))

    samples = [UnpairedSample(sample([1, 2], [10, 11, 12]), True), UnpairedSample(sample([3], [20]), False),
               UnpairedSample(sample([4, 5, 6], [30, 31]), True)]
    kl = [s.kl for s in with_kl_sequences(samples, 5)]
    assert [k.input_ids.tolist() for k in kl] == [[1, 2, 30, 31], [3, 10, 11, 12], [4, 5, 6, 20]]
    assert [k.labels.tolist() for k in kl] == [[-100, -100, 30, 31], [-100, 10, 11, 12], [-100, -100, -100, 20]]
    assert with_kl_sequences(samples, 3)[1].kl.input_ids.tolist() == [3, 10, 11]  # cut to sequence_len


SHIPPED = ("dpo_train.jsonl", "dpo_eval.jsonl")


def test_script_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_dpo_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_shipped_pairs_load_whole_and_are_checkable(tokenizer):
    rows = {name: [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines()] for name in SHIPPED}
    assert (len(rows[SHIPPED[0]]), len(rows[SHIPPED[1]])) == (400, 60)
    train_prompts = {json.dumps(row["messages"]) for row in rows[SHIPPED[0]]}
    assert not train_prompts & {json.dumps(row["messages"]) for row in rows[SHIPPED[1]]}  # eval is held out
    for name in SHIPPED:
        pairs, report = tokenize_preference_rows(DatasetConfig(path=str(DATA_DIR / name)), tokenizer, 256)
        assert (report.kept, report.skipped) == (len(rows[name]), {})
        assert max(max(len(p.chosen), len(p.rejected)) for p in pairs) < 120
        for row in rows[name]:
            values = dict(re.findall(r"(\w+)=(\w+)", row["messages"][1]["content"]))
            key = row["messages"][-1]["content"].removesuffix("?").split("\n")[-1]
            assert row["chosen"]["content"] == f"{key}={values[key]}"
            wrong_key, wrong = row["rejected"]["content"].split("=")
            assert wrong_key == key and wrong not in values.values()
