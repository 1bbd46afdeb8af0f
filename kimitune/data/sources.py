"""Where rows come from, and how one row becomes OpenAI-style messages.

A ``DatasetConfig`` names a local file (``.jsonl``, ``.json``, ``.parquet``), a local folder (every such file in it,
or its ``data_files``), or a hub dataset id (loaded with ``datasets.load_dataset``, which needs the network or the
hub cache). Parquet files and hub datasets are read through the ``datasets`` library. JSON and JSON-lines files are
read with the ``json`` module, one row at a time, because Arrow needs one type per column: a file whose ``content``
is a string in one row and a list of parts in another (both valid OpenAI messages), or whose bad row has a number
there, would fail as a whole instead of row by row.

``row_to_conversation`` applies the entry's mappings: ``field_messages`` (the list of messages),
``message_property_mappings`` (our message key -> the row's key, for role, content, name, tool_calls,
tool_call_id), ``roles`` (aliases per role; by default human -> user and gpt -> assistant, as in Axolotl),
``message_field_training`` (the per-message key whose flag becomes ``train``; ShareGPT's ``weight`` is read too)
and ``field_tools``. Content parts are read as Axolotl reads them: the text under ``text`` (or else ``content`` or
``value``), ``type`` ``"text"`` when missing, and ``train`` / ``weight`` flags. Every other key of a message or a
part is left out of the conversation and returned, so that the data report counts it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimitune.config import DatasetConfig
from kimitune.data.chat import FLAG_KEYS, ROLES, ConversationError

MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
PART_TEXT_KEYS = ("text", "content", "value")  # where a content part's text may be, first found wins
DEFAULT_ROLE_ALIASES = {
    "user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"], "tool": ["tool"]
}
_SUFFIX_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HASH_LIMIT = 256 * 2**20  # files above this are fingerprinted by size and mtime instead of their contents


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the dataset entry, the file and the problem."""


@dataclass
class Source:
    """One dataset entry, resolved: its local files or its loaded hub dataset."""

    name: str  # "datasets[0] path/to/file.jsonl"
    config: DatasetConfig
    files: list[Path]
    hub: Any = None  # a datasets.Dataset for hub ids

    def num_rows(self) -> int | None:
        """Rows to expect (JSON-lines: lines), for the progress bar; None when unknown without parsing."""
        if self.hub is not None:
            return len(self.hub)
        total = 0
        for path in self.files:
            if path.suffix == ".jsonl":
                with path.open("rb") as f:
                    total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            else:
                return None
        return total

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the rows: file contents (or size + mtime for big files), or the hub dataset's own."""
        if self.hub is not None:
            return {"hub": self.config.path, "fingerprint": self.hub._fingerprint}
        return {"files": [_file_fingerprint(path) for path in self.files]}

    def rows(self) -> Iterator[tuple[str, Any]]:
        """``(where, row)`` for every row; ``row`` is a ``ConversationError`` for a line that is not valid JSON."""
        if self.hub is not None:
            for number, row in enumerate(self.hub, start=1):
                yield f"{self.config.path}[{self.config.split}] row {number}", _drop_nones(row)
            return
        for path in self.files:
            if self._file_type(path) == "parquet":
                yield from _parquet_rows(path)
            else:
                yield from _json_rows(path)

    def _file_type(self, path: Path) -> str:
        return self.config.ds_type or _SUFFIX_TYPES[path.suffix]


def _file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    entry: dict[str, Any] = {"path": str(path.resolve()), "size": stat.st_size}
    if stat.st_size <= _HASH_LIMIT:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        entry["sha256"] = digest.hexdigest()
    else:
        entry["mtime_ns"] = stat.st_mtime_ns
    return entry


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        first = f.read(64).lstrip()
    if first.startswith(b"["):  # one JSON array of rows
        try:
            rows = json.loads(path.read_bytes())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not a valid JSON array of rows: {err}") from None
        for number, row in enumerate(rows, start=1):
            yield f"{path} row {number}", row
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):  # numbered as editors number lines
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                row = ConversationError("not valid JSON", str(err))
            yield f"{path} line {number}", row


def _drop_nones(value: Any) -> Any:
    """Arrow gives every row every key of its column's type, None where the row had none; this gives the row back
    as written (a tool call without an ``id`` must stay without one)."""
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    return value


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    for number, row in enumerate(table, start=1):
        yield f"{path} row {number}", _drop_nones(row)


def open_source(config: DatasetConfig, name: str) -> Source:
    """Resolves a dataset entry to its files, or loads it from the hub; raises ``DataError`` naming the entry."""
    label = f"{name} {config.path}"
    path = Path(config.path).expanduser()
    if path.is_file():
        if config.data_files is not None:
            raise DataError(f"{label}: data_files applies to a folder or a hub dataset, not to a file")
        files = [path]
    elif path.is_dir():
        files = _folder_files(path, config, label)
    elif path.suffix in _SUFFIX_TYPES or config.path.startswith((".", "/", "~")):
        raise DataError(f"{label}: file not found")
    else:
        return Source(name=label, config=config, files=[], hub=_load_hub(config, label))
    for file in files:
        if config.ds_type is None and file.suffix not in _SUFFIX_TYPES:
            raise DataError(f"{label}: cannot tell the format of {file}; set ds_type: json or parquet")
    return Source(name=label, config=config, files=files)


def _folder_files(folder: Path, config: DatasetConfig, label: str) -> list[Path]:
    if config.data_files is not None:
        patterns = [config.data_files] if isinstance(config.data_files, str) else config.data_files
        files = sorted({file for pattern in patterns for file in folder.glob(pattern) if file.is_file()})
    else:
        files = sorted(file for file in folder.rglob("*") if file.is_file() and file.suffix in _SUFFIX_TYPES)
    if not files:
        raise DataError(f"{label}: no .jsonl, .json or .parquet files in the folder")
    return files


def _load_hub(config: DatasetConfig, label: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(config.path, name=config.name, split=config.split, data_files=config.data_files)
    except Exception as err:  # datasets raises many types (network, missing split, missing config)
        raise DataError(f"{label}: not a local path, and loading it as a hub dataset failed: {err}") from err


def role_aliases(config: DatasetConfig) -> dict[str, str]:
    """Role name in the rows -> our role; every canonical role maps to itself."""
    aliases = config.roles if config.roles is not None else DEFAULT_ROLE_ALIASES
    unknown = [role for role in aliases if role not in ROLES]
    if unknown:
        raise DataError(f"roles: {unknown[0]!r} is not a role; the keys must be among {', '.join(ROLES)}")
    mapping = {role: role for role in ROLES}
    for role, names in aliases.items():
        mapping.update({name: role for name in names})
    return mapping


def check_mappings(config: DatasetConfig) -> None:
    """Raises ``DataError`` for a ``message_property_mappings`` key that names no message key."""
    for key in config.message_property_mappings:
        if key not in MESSAGE_KEYS:
            raise DataError(
                f"message_property_mappings: {key!r} is not a message key; known: {', '.join(MESSAGE_KEYS)}"
            )


def row_to_conversation(
    row: Any, config: DatasetConfig, aliases: Mapping[str, str]
) -> tuple[list[dict[str, Any]], list | None, list[str]]:
    """The row's messages in OpenAI form (keys mapped, roles de-aliased, ``train`` / ``weight`` flags, content parts
    normalised), its tools, and the keys it holds that kimitune does not read (``"message key 'x'"``, ``"content part
    key 'y'"``, each once, in order of appearance).

    Raises ``ConversationError`` for a row without a messages list or with a message that is not a mapping; the
    messages and tools themselves are checked when tokenised.
    """
    if not isinstance(row, Mapping):
        raise ConversationError("row is not an object", f"got {type(row).__name__}")
    raw = row.get(config.field_messages)
    if raw is None:
        raise ConversationError("missing messages field", f"no `{config.field_messages}` in the row")
    if not isinstance(raw, list):
        raise ConversationError("messages is not a list", f"`{config.field_messages}` is {type(raw).__name__}")
    keys = {key: config.message_property_mappings.get(key, key) for key in MESSAGE_KEYS}
    flags = {"weight": "weight", config.message_field_training: "train"}  # the row's key -> our flag
    known = {*keys.values(), *flags}
    messages: list[dict[str, Any]] = []
    ignored: dict[str, None] = {}  # an ordered set
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConversationError("message is not a mapping", f"message {i} is {type(item).__name__}")
        message = {key: item[source] for key, source in keys.items() if item.get(source) is not None}
        if isinstance(message.get("role"), str):
            message["role"] = aliases.get(message["role"], message["role"])
        message.update({flag: item[source] for source, flag in flags.items() if item.get(source) is not None})
        if isinstance(message.get("content"), list):
            message["content"] = [_read_part(part, ignored) for part in message["content"]]
        _note_unread(item, known, "message key", ignored)
        messages.append(message)
    return messages, row.get(config.field_tools) or None, list(ignored)


def _read_part(part: Any, ignored: dict[str, None]) -> Any:
    """A content part in OpenAI form (a part that is not a mapping is left for the checks to name)."""
    if not isinstance(part, Mapping):
        return part
    text_key = next((key for key in PART_TEXT_KEYS if part.get(key) is not None), "text")
    read = {"type": "text" if part.get("type") is None else part["type"], "text": part.get(text_key)}
    read.update({flag: part[flag] for flag in FLAG_KEYS if part.get(flag) is not None})
    _note_unread(part, {"type", text_key, *FLAG_KEYS}, "content part key", ignored)
    return read


def _note_unread(item: Mapping, known: set[str], kind: str, ignored: dict[str, None]) -> None:
    """Adds ``"<kind> '<key>'"`` to ``ignored`` (an ordered set) for each key of ``item`` outside ``known``."""
    unread = [key for key, value in item.items() if key not in known and value is not None]
    ignored.update(dict.fromkeys(f"{kind} {key!r}" for key in unread))
