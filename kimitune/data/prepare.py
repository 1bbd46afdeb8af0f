"""The whole data step of a run: config -> tokenised train and eval samples and their report, cached on disk.

``prepare_datasets`` reads every ``datasets:`` entry (and ``test_datasets:``), tokenises each row with its own
settings, counts every row it skips or truncates, holds out the eval split, and stores the result in the cache
(``kimitune.data.cache``); with the same inputs a later call loads it instead. ``run_preprocess`` is what
``kimitune preprocess CONFIG`` runs.

Preference data (``rl`` set): each row is a pair (``kimitune.data.preference``), shuffled and held out as a whole;
the prepared lists hold each pair as two samples, chosen then rejected (``pairs_to_samples``). KTO data (``rl:
kto``): each row one sample with its ``desirable`` label, kept beside the samples.

Eval set: the ``test_datasets`` when given; else ``val_set_size`` samples (a fraction below 1, a count from 1)
drawn from the merged training samples with the config's ``seed``; else none. ``shuffle_merged_datasets`` shuffles
the training samples (same seed) after the datasets are concatenated. ``train_on_inputs: true`` trains every token
but those that the messages' and parts' ``train`` / ``weight`` flags mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kimitune.config import TrainConfig, load_config
from kimitune.data import cache
from kimitune.data.chat import IGNORE_INDEX, ROLES, ConversationError, tokenize_conversation
from kimitune.data.packing import Sample, pack_epoch
from kimitune.data.preference import pairs_to_samples, tokenize_preference_rows, tokenize_unpaired_rows
from kimitune.data.report import DataReport, SourceReport
from kimitune.data.rows import note_unread, read_rows
from kimitune.data.sources import DataError, Source, check_mappings, open_source, role_aliases, row_to_conversation
from kimitune.data.tokenizer import TOKENIZER_DEFAULT, load_tokenizer


@dataclass
class PreparedData:
    """Tokenised samples, each at most ``sequence_len`` tokens, and the report of how they were made."""

    train: list[Sample]
    eval: list[Sample]
    report: DataReport
    desirable: dict[str, list[bool]] | None = None  # rl: kto: each sample's label, per split ("train", "eval")


def _check(config: TrainConfig, tokenizer: Any) -> None:
    if not config.datasets:
        raise DataError("no `datasets:` in the config: nothing to train on")
    if config.val_set_size > 0 and config.test_datasets:
        raise DataError("set val_set_size or test_datasets, not both")
    if config.chat_template not in (None, TOKENIZER_DEFAULT) and tokenizer.chat_template != config.chat_template:
        raise DataError(
            "the tokenizer's chat template is not the config's chat_template; load the tokenizer with "
            "kimitune.data.load_tokenizer(path, trust_remote_code, chat_template=config.chat_template)"
        )
    for where, entries in (("datasets", config.datasets), ("test_datasets", config.test_datasets)):
        for i, entry in enumerate(entries):
            roles = entry.roles_to_train if entry.roles_to_train is not None else config.roles_to_train
            try:
                check_mappings(entry)
                role_aliases(entry)
                unknown = [role for role in roles if role not in ROLES]
                if unknown:
                    raise DataError(f"roles_to_train: {unknown[0]!r} is not a role; known: {', '.join(ROLES)}")
            except DataError as err:
                raise DataError(f"{where}[{i}] {entry.path}: {err}") from None


def _tokenize_source(
    source: Source, config: TrainConfig, tokenizer: Any, split: str, progress: Progress
) -> tuple[list[Sample], SourceReport]:
    entry = source.config
    roles_to_train = entry.roles_to_train if entry.roles_to_train is not None else config.roles_to_train
    if config.train_on_inputs:
        roles_to_train = ROLES
    train_on_eos = entry.train_on_eos or config.train_on_eos
    aliases = role_aliases(entry)

    def make(row: Any, where: str, report: SourceReport) -> tuple[Sample, list[Sample]]:
        messages, tools, ignored = row_to_conversation(row, entry, aliases)
        tokens = tokenize_conversation(tokenizer, messages, roles_to_train, train_on_eos, tools)
        input_ids = np.asarray(tokens["input_ids"], dtype=np.int32)
        flag_masked = np.asarray(tokens["flag_masked"], dtype=np.int64)
        labels = np.asarray(tokens["labels"], dtype=np.int32)
        if config.train_on_inputs:
            labels = input_ids.copy()
            labels[flag_masked] = IGNORE_INDEX
        if len(input_ids) > config.sequence_len:
            if config.excess_length_strategy == "drop":
                raise ConversationError(f"longer than sequence_len ({config.sequence_len})")
            input_ids, labels = input_ids[: config.sequence_len], labels[: config.sequence_len]
            if not np.any(labels[1:] != IGNORE_INDEX):
                raise ConversationError(f"nothing trained within sequence_len ({config.sequence_len})")
            report.truncated.add(where)
        note_unread(report, ignored, where)
        masked = int(np.count_nonzero(flag_masked < len(input_ids)))
        if masked:
            report.flag_masked.add(where)
            report.flag_masked_tokens += masked
        sample = Sample(input_ids, labels)
        return sample, [sample]

    return read_rows(source, split, progress, make)


def _hold_out(samples: list[Sample], val_set_size: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    count = int(val_set_size) if val_set_size >= 1 else round(val_set_size * len(samples))
    if not 1 <= count < len(samples):
        raise DataError(
            f"val_set_size: {val_set_size} of {len(samples)} training samples holds out {count}; "
            "it must leave at least one sample on each side"
        )
    held_out = np.random.default_rng(seed).permutation(len(samples))[:count]
    is_eval = np.zeros(len(samples), dtype=bool)
    is_eval[held_out] = True
    return [s for s, e in zip(samples, is_eval) if not e], [samples[i] for i in held_out]


def _holds_pairs(config: TrainConfig) -> bool:
    """Whether the prepared lists hold preference pairs, two samples each (rl set, but not KTO's unpaired data)."""
    return config.rl is not None and config.rl != "kto"


def _tokenize_all(
    config: TrainConfig, tokenizer: Any, train_sources: Sequence[Source], eval_sources: Sequence[Source], show: bool
) -> tuple[list[Sample], list[Sample], DataReport, dict[str, list[bool]] | None]:
    pairs = _holds_pairs(config)
    report = DataReport(unit="pairs" if pairs else "samples")
    train: list[Sample] = []
    eval: list[Sample] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show) as progress:
        for sources, split, out in ((train_sources, "train", train), (eval_sources, "eval", eval)):
            for source in sources:
                preference = dict(name=source.name.partition(" ")[0], split=split, train_on_eos=config.train_on_eos,
                                  progress=progress)
                if config.rl == "kto":
                    items, source_report = tokenize_unpaired_rows(source.config, tokenizer, config.sequence_len,
                                                                  **preference)
                elif pairs:
                    items, source_report = tokenize_preference_rows(
                        source.config, tokenizer, config.sequence_len, field_chosen=source.config.field_chosen,
                        field_rejected=source.config.field_rejected, **preference)
                else:
                    items, source_report = _tokenize_source(source, config, tokenizer, split, progress)
                out.extend(items)
                report.sources.append(source_report)
    if config.shuffle_merged_datasets:
        train = [train[i] for i in np.random.default_rng(config.seed).permutation(len(train))]
    if eval_sources:
        report.eval_from = "test_datasets"
    elif config.val_set_size > 0:
        train, eval = _hold_out(train, config.val_set_size, config.seed)
        report.eval_from = f"val_set_size {config.val_set_size:g} of the training {report.unit}"
    desirable = None
    if config.rl == "kto":
        desirable = {"train": [u.desirable for u in train], "eval": [u.desirable for u in eval]}
        train, eval = [u.sample for u in train], [u.sample for u in eval]
    elif pairs:
        train, eval = pairs_to_samples(train), pairs_to_samples(eval)
    return train, eval, report, desirable


def prepare_datasets(config: TrainConfig, tokenizer: Any, progress: bool = True) -> PreparedData:
    """Tokenised train and eval samples for ``config``, from the cache when it holds them (see the module doc).

    Raises ``DataError`` naming the dataset entry and file for unusable configuration or data, including a dataset
    in which no row survives (with the reasons and example rows).
    """
    _check(config, tokenizer)
    train_sources = [open_source(entry, f"datasets[{i}]") for i, entry in enumerate(config.datasets)]
    eval_sources = [open_source(entry, f"test_datasets[{i}]") for i, entry in enumerate(config.test_datasets)]
    parts = cache.key_parts(config, tokenizer, train_sources, eval_sources)
    directory = cache.cache_root(config) / cache.cache_key(parts)
    pairs = _holds_pairs(config)
    cached = cache.load(directory)
    if cached is not None:
        train, eval, report, desirable = cached
        report.from_cache = True
    else:
        train, eval, report, desirable = _tokenize_all(config, tokenizer, train_sources, eval_sources, progress)
        per_item = 2 if pairs else 1  # a pair is stored as two samples
        report.train_samples, report.eval_samples = len(train) // per_item, len(eval) // per_item
        cache.save(directory, parts, train, eval, report, desirable)
    report.cache_dir = str(directory)
    if config.sample_packing:
        # Depends on micro_batch_size, which the cache key leaves out: computed on every call.
        capacity = config.micro_batch_size * config.sequence_len
        lengths = [len(s) for s in train]
        if pairs:  # a pair is packed whole
            lengths = [a + b for a, b in zip(lengths[0::2], lengths[1::2])]
        bins = pack_epoch(lengths, capacity, config.seed, epoch=0)
        report.packed_batches = len(bins)
        report.packing_efficiency = sum(len(s) for s in train) / (len(bins) * capacity)
    return PreparedData(train=train, eval=eval, report=report, desirable=desirable)


def run_preprocess(config: TrainConfig | str | Path, console: Console | None = None) -> PreparedData:
    """``kimitune preprocess CONFIG``: loads the config and tokenizer, fills the cache, prints the report."""
    console = console or Console()
    if not isinstance(config, TrainConfig):
        config, warnings = load_config(config)
        for warning in warnings:
            console.print(f"[yellow]warning:[/] {warning}")
    tokenizer = load_tokenizer(config.tokenizer_path, config.trust_remote_code, config.chat_template)
    prepared = prepare_datasets(config, tokenizer, progress=True)
    console.print(prepared.report)
    return prepared
