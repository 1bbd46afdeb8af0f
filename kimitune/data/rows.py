"""The loop over one source's rows that every kind of data shares (fine-tuning samples, preference pairs, KTO
samples): each row becomes an item or is skipped, counted by its reason with its place, and the kept rows' tokens are
counted. What a row becomes is the caller's ``make``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kimitune.data.chat import IGNORE_INDEX, ConversationError
from kimitune.data.packing import Sample
from kimitune.data.report import SourceReport, Tally
from kimitune.data.sources import DataError, Source

Make = Callable[[Any, str, SourceReport], tuple[Any, list[Sample]]]


def read_rows(source: Source, split: str, progress: Any, make: Make) -> tuple[list[Any], SourceReport]:
    """Every usable row of ``source`` as ``make(row, where, report)`` makes it: (the item, its tokenised samples).
    ``make`` raises ``ConversationError`` for a row to skip (the report counts it by ``reason`` at ``where``, the
    1-based line or row) and may note more in the report (truncation, unread keys) for a row it keeps.
    ``progress``: a ``rich.progress.Progress`` to advance, or None. Raises ``DataError`` when no row is usable."""
    report = SourceReport(name=source.name, split=split)
    task = progress.add_task(source.name, total=source.num_rows()) if progress is not None else None
    items = []
    started = time.perf_counter()
    for where, row in source.rows():
        report.rows += 1
        if task is not None:
            progress.advance(task)
        try:
            if isinstance(row, ConversationError):  # a line the source could not parse
                raise row
            item, samples = make(row, where, report)
        except ConversationError as err:
            report.skip(err.reason, where)
            continue
        items.append(item)
        report.kept += 1
        report.tokens += sum(len(s) for s in samples)
        report.trained_tokens += sum(int(np.count_nonzero(s.labels != IGNORE_INDEX)) for s in samples)
    if task is not None:
        progress.update(task, total=report.rows)
    report.seconds = time.perf_counter() - started
    if not items:
        raise DataError(f"{source.name}: no usable rows out of {report.rows}: {report.problems() or 'it holds no rows'}")
    return items, report


def note_unread(report: SourceReport, keys: list[str], where: str) -> None:
    """Counts a kept row's keys that nothing read (the report lists them, so a misspelt field is seen)."""
    for key in keys:
        report.ignored_keys.setdefault(key, Tally()).add(where)
