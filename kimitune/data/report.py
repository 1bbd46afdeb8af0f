"""What preprocessing kept, skipped and truncated, per source, with example rows: ``DataReport``.

Nothing is dropped silently: every skipped row is counted under its reason with up to ``MAX_EXAMPLES`` example
locations, counted from 1 (``file.jsonl line N`` for JSON lines, the line an editor shows; ``row N`` for JSON
arrays, Parquet files and hub datasets), and every truncated sample too.
``rich.console.Console().print(report)`` prints it as a table.

For the kept rows it also counts the message and content-part keys that kimitune does not read, and the tokens that
the ``train`` / ``weight`` flags masked (those the role rule alone would have trained).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

MAX_EXAMPLES = 3


@dataclass
class Tally:
    """How many rows had one outcome, and where the first few of them are."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(where)


@dataclass
class SourceReport:
    """One entry of ``datasets:`` or ``test_datasets:``."""

    name: str
    split: str  # "train" or "eval": where its samples go
    rows: int = 0
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: Tally = field(default_factory=Tally)
    skipped: dict[str, Tally] = field(default_factory=dict)
    flag_masked: Tally = field(default_factory=Tally)  # kept rows in which train/weight flags masked tokens
    flag_masked_tokens: int = 0
    ignored_keys: dict[str, Tally] = field(default_factory=dict)  # "message key 'x'" -> kept rows holding it
    seconds: float = 0.0  # reading and tokenising the source

    def tokens_per_second(self) -> float | None:
        """Preprocessing speed: the kept tokens (before truncation's cut, the tokens tokenised) per second."""
        return self.tokens / self.seconds if self.seconds > 0 else None

    def skip(self, reason: str, where: str) -> None:
        self.skipped.setdefault(reason, Tally()).add(where)

    def problems(self) -> str:
        """The skip reasons as one line: ``12 x missing role (a.jsonl line 3, ...); ...``."""
        return _tallies(self.skipped)


def _tallies(tallies: dict[str, Tally]) -> str:
    parts = []
    for reason, tally in sorted(tallies.items(), key=lambda item: -item[1].count):
        more = ", ..." if tally.count > len(tally.examples) else ""
        parts.append(f"{tally.count} x {reason} ({', '.join(tally.examples)}{more})")
    return "; ".join(parts)


@dataclass
class DataReport:
    """The preprocessing report: per-source counts, the eval split, packing efficiency and the cache used."""

    sources: list[SourceReport] = field(default_factory=list)
    train_samples: int = 0
    eval_samples: int = 0
    unit: str = "samples"  # "pairs" for preference data (each pair two samples: chosen and rejected)
    eval_from: str = "none"
    packing_efficiency: float | None = None
    packed_batches: int | None = None
    cache_dir: str | None = None
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        sources = []
        for source in data["sources"]:
            source = dict(source)
            source["truncated"] = Tally(**source["truncated"])
            source["flag_masked"] = Tally(**source["flag_masked"])
            for key in ("skipped", "ignored_keys"):
                source[key] = {reason: Tally(**tally) for reason, tally in source[key].items()}
            sources.append(SourceReport(**source))
        return cls(**{**data, "sources": sources})

    def __rich__(self) -> Group:
        # The table names each source by its key (datasets[0]) and fits 80 columns; the paths follow below it, as
        # lines of their own (inside a cell, a path was folded into a column a dozen characters wide).
        table = Table(title="Data", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
        table.add_column("source", no_wrap=True)
        table.add_column("split")
        for column in ("rows", "kept", "skipped", "truncated", "tokens", "trained"):
            table.add_column(column, justify="right", overflow="fold")  # a number cut with an ellipsis reads wrong
        for s in self.sources:
            skipped = sum(t.count for t in s.skipped.values())
            key, _, _ = s.name.partition(" ")
            table.add_row(
                key, s.split, f"{s.rows:,}", f"{s.kept:,}", f"{skipped:,}", f"{s.truncated.count:,}",
                f"{s.tokens:,}", f"{s.trained_tokens:,}",
            )
        lines = [f"{key}: {path}" for key, _, path in (s.name.partition(" ") for s in self.sources) if path]
        for s in self.sources:
            speed = s.tokens_per_second()
            if speed is not None and not self.from_cache:
                lines.append(f"tokenised {s.name} in {s.seconds:.1f} s: {speed:,.0f} tokens/s")
            if s.skipped:
                lines.append(Text(f"skipped in {s.name}: {s.problems()}", style="yellow"))
            if s.truncated.count:
                where = ", ".join(s.truncated.examples)
                lines.append(f"truncated to sequence_len in {s.name}: {s.truncated.count} ({where}, ...)")
            if s.flag_masked.count:
                where = ", ".join(s.flag_masked.examples)
                lines.append(f"masked by train/weight flags in {s.name}: {s.flag_masked_tokens} tokens in "
                             f"{s.flag_masked.count} rows ({where}, ...)")
            if s.ignored_keys:
                lines.append(Text(f"keys not read in {s.name}: {_tallies(s.ignored_keys)}", style="yellow"))
        lines.append(f"train {self.unit}: {self.train_samples}; eval {self.unit}: {self.eval_samples} "
                     f"({self.eval_from})")
        if self.packing_efficiency is not None:
            lines.append(f"packing: {self.packed_batches} batches per epoch, efficiency {self.packing_efficiency:.1%}")
        if self.cache_dir is not None:
            lines.append(f"{'loaded from' if self.from_cache else 'cached in'} {self.cache_dir}")
        return Group(table, *(line if isinstance(line, Text) else Text(line) for line in lines))
