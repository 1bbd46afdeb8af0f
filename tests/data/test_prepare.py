"""prepare_datasets: sources, field mappings, bad-row report, length handling, eval split and the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import DATA_DIR, TOKENIZER_DIR
from rich.console import Console

from kimitune.config import parse_config
from kimitune.data import DataError, IGNORE_INDEX, prepare_datasets, run_preprocess, tokenize_conversation
from kimitune.data import prepare as prepare_module


def make_config(tmp_path, datasets, **overrides):
    raw = {
        "init_from_config": "unused.json",
        "tokenizer": str(TOKENIZER_DIR),
        "datasets": datasets,
        "sequence_len": 64,
        "dataset_prepared_path": str(tmp_path / "cache"),
        **overrides,
    }
    return parse_config(raw)[0]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat(*contents, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, content in enumerate(contents):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return {"messages": messages}


GOOD = chat("What is cat?", "red")
LONG = chat("word " * 80, "red")


def test_bad_rows_are_counted_by_reason_with_examples(tmp_path, tokenizer):
    rows = [
        GOOD,                                                        # line 1
        "{not json",                                                 # line 2
        {"other": 1},                                                # line 3
        {"messages": []},                                            # line 4
        {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},  # line 5
        {"messages": [{"role": "robot", "content": "x"}]},           # line 6
        {"messages": [{"role": "user", "content": 5}]},              # line 7
        chat("only a question"),                                     # line 8
        LONG,                                                        # line 9
        GOOD,                                                        # line 10
        "",                                                          # line 11: blank, not a row
        {"messages": [{"content": "x"}]},                            # line 12
        {"messages": "hello"},                                       # line 13
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    prepared = prepare_datasets(make_config(tmp_path, [{"path": str(path)}]), tokenizer, progress=False)
    (source,) = prepared.report.sources
    assert (source.rows, source.kept, len(prepared.train)) == (12, 2, 2)
    counts = {reason: (tally.count, tally.examples) for reason, tally in source.skipped.items()}
    # Line numbers as an editor shows them (the first line is 1; the blank line 11 counts as a line, not a row).
    where = lambda *lines: [f"{path} line {n}" for n in lines]  # noqa: E731
    assert counts == {
        "not valid JSON": (1, where(2)),
        "missing messages field": (1, where(3)),
        "empty conversation": (1, where(4)),
        "missing role": (2, where(5, 12)),
        "unknown role": (1, where(6)),
        "content of the wrong type": (1, where(7)),
        "no trainable token": (1, where(8)),
        "longer than sequence_len (64)": (1, where(9)),
        "messages is not a list": (1, where(13)),
    }
    console = Console(record=True, width=300)
    console.print(prepared.report)
    printed = console.export_text()
    assert "2 x missing role" in printed and f"{path} line 5" in printed and "train samples: 2" in printed


def test_truncation_is_counted(tmp_path, tokenizer):
    answer_late = chat("word " * 80, "red")
    answer_early = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "word " * 80}]}
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, answer_early, answer_late])
    config = make_config(tmp_path, [{"path": str(path)}], excess_length_strategy="truncate")
    prepared = prepare_datasets(config, tokenizer, progress=False)
    (source,) = prepared.report.sources
    assert source.truncated.count == 1 and source.truncated.examples == [f"{path} line 2"]
    assert source.skipped["nothing trained within sequence_len (64)"].examples == [f"{path} line 3"]
    assert max(len(s) for s in prepared.train) == 64


def test_empty_dataset_is_an_error_naming_file_and_reasons(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "empty.jsonl", [chat("q"), {"messages": []}])
    with pytest.raises(DataError) as err:
        prepare_datasets(make_config(tmp_path, [{"path": str(path)}]), tokenizer, progress=False)
    message = str(err.value)
    assert str(path) in message and "no usable rows out of 2" in message
    assert f"1 x no trainable token ({path} line 1)" in message and "empty conversation" in message


def test_several_datasets_each_with_its_own_settings(tmp_path, tokenizer):
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ])
    custom = write_jsonl(tmp_path / "custom.jsonl", [
        {"messages": [
            {"role": "user", "content": "u1"}, {"role": "bot", "content": "b1", "learn": False},
            {"role": "user", "content": "u2"}, {"role": "bot", "content": "b2"},
        ]},
    ])
    datasets = [
        {"path": str(sharegpt), "field_messages": "conversations",
         "message_property_mappings": {"role": "from", "content": "value"}},
        {"path": str(custom), "roles": {"assistant": ["bot"]}, "roles_to_train": ["user", "assistant"],
         "train_on_eos": "none", "message_field_training": "learn"},
    ]
    prepared = prepare_datasets(
        make_config(tmp_path, datasets, shuffle_merged_datasets=False), tokenizer, progress=False
    )
    first, second = prepared.train

    def trained(sample):
        return tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])

    assert trained(first) == "hello<|im_end|>"
    assert trained(second) == "u1u2b2"  # b1 opted out; no end-of-turn tokens
    assert tokenizer.decode(second.input_ids).startswith("<|im_user|>user<|im_middle|>u1<|im_end|><|im_assistant|>")


def test_parquet_json_array_and_folder_sources(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_calls = {"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [{**call, "id": "call_7"}, call]},
    ]}
    rows = [GOOD, with_calls]
    pq.write_table(pa.Table.from_pylist(rows), folder / "a.parquet")
    (folder / "b.json").write_text(json.dumps(rows))
    write_jsonl(folder / "c.jsonl", rows)
    (folder / "notes.txt").write_text("ignored: not a data file")
    prepared = prepare_datasets(make_config(tmp_path, [{"path": str(folder)}], sequence_len=256), tokenizer,
                                progress=False)
    assert prepared.report.sources[0].rows == 6 and len(prepared.train) == 6
    # Arrow fills the second call's missing "id" with None; it must render as Kimi's "functions.f:1" again.
    expected = sorted(tuple(tokenize_conversation(tokenizer, r["messages"])["input_ids"]) for r in rows * 3)
    assert sorted(tuple(s.input_ids.tolist()) for s in prepared.train) == expected
    assert "functions.f:1" in tokenizer.decode(expected[0] if len(expected[0]) > len(expected[-1]) else expected[-1])
    only_parquet = make_config(tmp_path, [{"path": str(folder), "data_files": "*.parquet"}], sequence_len=256)
    assert len(prepare_datasets(only_parquet, tokenizer, progress=False).train) == 2


def test_hub_dataset_ids_go_through_datasets(tmp_path, tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split))
        if path == "offline/missing":
            raise ConnectionError("Couldn't reach 'offline/missing' on the Hub")
        return datasets.Dataset.from_list([GOOD, {"messages": []}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = make_config(tmp_path, [{"path": "someone/recall", "split": "validation"}])
    prepared = prepare_datasets(config, tokenizer, progress=False)
    assert calls == [("someone/recall", None, "validation")] and len(prepared.train) == 1
    assert prepared.report.sources[0].skipped["empty conversation"].examples == [
        "someone/recall[validation] row 2"  # rows counted from 1, as lines are
    ]
    with pytest.raises(DataError, match="offline/missing: not a local path, and loading it as a hub dataset failed"):
        prepare_datasets(make_config(tmp_path, [{"path": "offline/missing"}]), tokenizer, progress=False)


def test_config_problems_are_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(DataError, match="file not found"):
        prepare_datasets(make_config(tmp_path, [{"path": str(tmp_path / "nope.jsonl")}]), tokenizer, progress=False)
    with pytest.raises(DataError, match=r"datasets\[0\] .*'speaker' is not a message key"):
        bad_mapping = [{"path": str(path), "message_property_mappings": {"speaker": "from"}}]
        prepare_datasets(make_config(tmp_path, bad_mapping), tokenizer, progress=False)
    with pytest.raises(DataError, match="'robot' is not a role"):
        prepare_datasets(make_config(tmp_path, [{"path": str(path)}], roles_to_train=["robot"]), tokenizer,
                         progress=False)
    with pytest.raises(DataError, match="val_set_size or test_datasets, not both"):
        config = make_config(tmp_path, [{"path": str(path)}], val_set_size=0.1, test_datasets=[{"path": str(path)}])
        prepare_datasets(config, tokenizer, progress=False)
    with pytest.raises(DataError, match="holds out 0"):
        prepare_datasets(make_config(tmp_path, [{"path": str(path)}], val_set_size=0.1), tokenizer, progress=False)


def test_eval_split_from_val_set_size_or_test_datasets(tmp_path, tokenizer):
    train_path = DATA_DIR / "quickstart_train.jsonl"
    rows = train_path.read_text().splitlines()[:40]
    path = write_jsonl(tmp_path / "forty.jsonl", rows)

    def prepared(**overrides):
        config = make_config(tmp_path, [{"path": str(path)}], sequence_len=256, **overrides)
        return prepare_datasets(config, tokenizer, progress=False)

    by_fraction, by_count, other_seed = prepared(val_set_size=0.25), prepared(val_set_size=10), prepared(
        val_set_size=10, seed=7
    )
    for split in (by_fraction, by_count, other_seed):
        assert (len(split.train), len(split.eval)) == (30, 10)
        train = {tuple(s.input_ids.tolist()) for s in split.train}
        assert not train & {tuple(s.input_ids.tolist()) for s in split.eval}
    key = lambda p: [s.input_ids.tolist() for s in p.eval]  # noqa: E731
    assert key(by_fraction) == key(by_count) != key(other_seed)  # 0.25 of 40 is 10; both use the default seed
    eval_path = write_jsonl(tmp_path / "eval.jsonl", rows[:5])
    separate = prepared(test_datasets=[{"path": str(eval_path)}])
    assert (len(separate.train), len(separate.eval), separate.report.eval_from) == (40, 5, "test_datasets")


def test_train_on_inputs_trains_every_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat("only a question")])
    prepared = prepare_datasets(make_config(tmp_path, [{"path": str(path)}], train_on_inputs=True), tokenizer,
                                progress=False)
    assert len(prepared.train) == 2
    assert all(np.array_equal(s.input_ids, s.labels) for s in prepared.train)


def test_second_run_reuses_the_cache(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, chat("What is dog?", "blue"), {"messages": []}])
    config = make_config(tmp_path, [{"path": str(path)}], sample_packing=True)
    first = prepare_datasets(config, tokenizer, progress=False)
    assert not first.report.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(prepare_module, "tokenize_conversation", no_tokenizing)
    second = prepare_datasets(config, tokenizer, progress=False)
    assert second.report.from_cache and second.report.cache_dir == first.report.cache_dir
    assert [s.input_ids.tolist() for s in second.train] == [s.input_ids.tolist() for s in first.train]
    assert [s.labels.tolist() for s in second.train] == [s.labels.tolist() for s in first.train]
    assert second.report.sources == first.report.sources
    assert second.report.packing_efficiency == first.report.packing_efficiency
    # Anything that changes the samples changes the key: settings, the template, the data.
    changed = [
        make_config(tmp_path, [{"path": str(path)}], sample_packing=True, train_on_eos="none"),
        make_config(tmp_path, [{"path": str(path), "roles_to_train": ["user", "assistant"]}], sample_packing=True),
    ]
    for other in changed:
        with pytest.raises(AssertionError, match="tokenised again"):
            prepare_datasets(other, tokenizer, progress=False)
    write_jsonl(path, [GOOD])
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_datasets(config, tokenizer, progress=False)


def test_cache_key_covers_the_chat_template(tmp_path, tokenizer, default_system_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    config = make_config(tmp_path, [{"path": str(path)}])
    plain = prepare_datasets(config, tokenizer, progress=False)
    with_default_system = prepare_datasets(config, default_system_tokenizer, progress=False)
    assert plain.report.cache_dir != with_default_system.report.cache_dir
    assert len(with_default_system.train[0]) > len(plain.train[0])


def test_run_preprocess_prints_the_report(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": []}])
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        f"init_from_config: unused.json\ntokenizer: {TOKENIZER_DIR}\nsequence_len: 64\n"
        f"datasets:\n  - path: {path}\ndataset_prepared_path: {tmp_path / 'cache'}\n"
    )
    console = Console(record=True, width=300)
    prepared = run_preprocess(config_path, console=console)
    printed = console.export_text()
    assert len(prepared.train) == 1
    assert "1 x empty conversation" in printed and "cached in" in printed
    run_preprocess(config_path, console=console)
    assert "loaded from" in console.export_text()


def locations(path):
    """Each row's location as the report writes it."""
    from kimitune.config import DatasetConfig
    from kimitune.data.sources import open_source

    return [where for where, _ in open_source(DatasetConfig(path=str(path)), "datasets[0]").rows()]


REASONING = [  # issue 27's example as a row: parts without "type", one with its text under Axolotl's "value"
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": [
        {"text": "Let me think: 2 and 2.", "weight": 0},
        {"value": " The answer is 4.", "train": True, "cache_control": {"type": "ephemeral"}},
    ]},
]


def trained_text(tokenizer, sample):
    return tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])


def test_flags_masked_tokens_and_unread_keys_are_reported(tmp_path, tokenizer):
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [  # ShareGPT's 0/1 weight
            {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "four", "weight": 0},
            {"from": "human", "value": "again?"}, {"from": "gpt", "value": "4", "weight": 1},
        ]},
        {"conversations": [{"from": "human", "value": "hi", "timestamp": 1},
                           {"from": "gpt", "value": "a", "weight": 0.5}]},  # a weight kimitune cannot honour
        {"conversations": [{"from": "human", "value": "hi", "timestamp": 2},
                           {"from": "gpt", "value": "b", "train": 1}]},
    ])
    parts = write_jsonl(tmp_path / "parts.jsonl", [
        {"messages": REASONING},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]},
                      {"role": "assistant", "content": "a"}]},
        GOOD,
    ])
    datasets = [
        {"path": str(sharegpt), "field_messages": "conversations",
         "message_property_mappings": {"role": "from", "content": "value"}},
        {"path": str(parts)},
    ]
    config = make_config(tmp_path, datasets, shuffle_merged_datasets=False)
    prepared = prepare_datasets(config, tokenizer, progress=False)
    first, second = prepared.report.sources
    share_at, parts_at = locations(sharegpt), locations(parts)

    assert [trained_text(tokenizer, s) for s in prepared.train] == [
        "4<|im_end|>", "b<|im_end|>", " The answer is 4.<|im_end|>", "red<|im_end|>",
    ]
    assert (first.kept, second.kept) == (2, 2)
    assert first.skipped["train flag is not true/false/0/1"].examples == [share_at[1]]
    assert second.skipped["content of the wrong type"].examples == [parts_at[1]]
    four = len(tokenizer.encode("four", add_special_tokens=False))
    masked = lambda s: (s.flag_masked.count, s.flag_masked.examples, s.flag_masked_tokens)  # noqa: E731
    assert masked(first) == (1, [share_at[0]], four + 1)  # "four" and its end of turn
    assert masked(second) == (1, [parts_at[0]], 10)  # "Let me think: 2 and 2."
    # Unread keys of kept rows are counted; the skipped rows' are not (their skip is reported).
    assert {k: (t.count, t.examples) for k, t in first.ignored_keys.items()} == {
        "message key 'timestamp'": (1, [share_at[2]])
    }
    assert {k: (t.count, t.examples) for k, t in second.ignored_keys.items()} == {
        "content part key 'cache_control'": (1, [parts_at[0]])
    }
    console = Console(record=True, width=300)
    console.print(prepared.report)
    printed = console.export_text()
    assert f"masked by train/weight flags in {second.name}: 10 tokens in 1 rows ({parts_at[0]}, ...)" in printed
    assert f"keys not read in {first.name}: 1 x message key 'timestamp' ({share_at[2]})" in printed
    # The report and the samples come back from the cache as they were made.
    again = prepare_datasets(config, tokenizer, progress=False)
    assert again.report.from_cache and again.report.sources == prepared.report.sources
    assert [s.labels.tolist() for s in again.train] == [s.labels.tolist() for s in prepared.train]


def test_train_on_inputs_keeps_what_the_flags_mask(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": REASONING}])
    config = make_config(tmp_path, [{"path": str(path)}], train_on_inputs=True)
    (sample,) = prepare_datasets(config, tokenizer, progress=False).train
    masked = list(range(11, 21))  # "Let me think: 2 and 2." (see test_issue_example_masks_the_flagged_part)
    assert tokenizer.decode(sample.input_ids[masked]) == "Let me think: 2 and 2."
    assert sample.labels.tolist() == [IGNORE_INDEX if p in masked else t for p, t in enumerate(sample.input_ids)]


def test_message_field_training_can_name_weight(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "q", "weight": 1},
                      {"role": "assistant", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]},
    ])
    config = make_config(tmp_path, [{"path": str(path), "message_field_training": "weight"}])
    prepared = prepare_datasets(config, tokenizer, progress=False)
    assert trained_text(tokenizer, prepared.train[0]) == "q<|im_end|>b<|im_end|>"
    assert not prepared.report.sources[0].ignored_keys


def test_the_report_fits_80_columns_with_whole_paths_and_numbers(tmp_path, tokenizer):
    folder = tmp_path / "a-rather-long-folder-name-for-the-data" / "of-this-run"
    folder.mkdir(parents=True)
    path = write_jsonl(folder / "conversations.jsonl", [GOOD, GOOD, {"messages": []}])
    prepared = prepare_datasets(make_config(tmp_path, [{"path": str(path)}]), tokenizer, progress=False)
    prepared.report.sources[0].tokens = 1_234_567_890  # a large dataset's count: folded, never cut
    console = Console(record=True, width=80)
    console.print(prepared.report)
    printed = console.export_text().splitlines()
    assert max(len(line) for line in printed) <= 80
    table = printed[: next(i for i, line in enumerate(printed) if line.startswith("datasets[0]: "))]
    assert "1,234,567,890" in "".join(table) and "…" not in "".join(table)  # numbers whole, paths below the table
    assert str(path) in "".join(line.strip() for line in printed)  # wrapped, nothing cut
