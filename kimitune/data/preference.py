"""Preference data (DPO, IPO, ORPO, SimPO) and unpaired feedback (KTO): rows -> whole sequences -> packed batches.

Every reply becomes one WHOLE sequence, prompt + reply, rendered by the tokenizer's own chat template and tokenised
by ``tokenize_conversation`` with the prompt's messages flagged ``train: false`` and the reply ``train: true``: the
labels are -100 on every prompt token (the earlier assistant turns of a multi-turn prompt too) and equal the tokens
that SFT trains for that reply (its end of turn included, per ``train_on_eos``). A pair's chosen and rejected
sequences share their prompt tokens: the same ``input_ids`` up to the first trained label (checked).

Row layouts, by the ``type:`` of a dataset entry (Axolotl's names). The ``chatml.`` / ``llama3.`` prefix names the
row layout only: kimitune renders every row with the tokenizer's chat template, never a hard-coded ChatML or Llama 3.

- ``chat_template`` / ``chat_template.default``: ``field_messages`` (the prompt's messages), ``field_chosen`` and
  ``field_rejected`` (each the reply message); the entry's ``message_property_mappings`` and ``roles`` apply.
- ``{chatml,llama3,chat_template}.argilla_chat``: ``chosen`` and ``rejected`` message lists; the prompt is what
  precedes their last messages, and must be the same in both.
- ``{chatml,llama3}.prompt_pairs``: ``system`` (optional), ``prompt``, ``chosen``, ``rejected``; ``.intel`` reads
  ``question`` for the prompt, ``.icr`` ``input``, ``.argilla`` ``instruction``, ``chosen_response`` and
  ``rejected_response``; ``.ultra`` is ``prompt_pairs`` whose replies are message lists.
- ``chat_template.argilla`` (Axolotl's ORPO layout): ``argilla_chat`` with an optional ``system`` and ``prompt``.

In every layout a prompt or a reply may be a string (a user turn, an assistant reply), a message, or a list of
messages. A reply given as a list is its last message; the messages before it are the prompt when the row has none
(they must then be the same for chosen and rejected) and must repeat the end of the row's prompt when it has one.

KTO rows (``UNPAIRED_TYPES``): a prompt (``prompt``, ``question``, ``instruction`` as above, or ``field_messages``
for ``chat_template``), a ``completion`` (as a reply above) and a boolean ``label`` (true: desirable). KTO's KL term
scores each sample's prompt with another sample's reply (``with_kl_sequences``: TRL's rotation by one, over the
prepared order, so that the pairing and its reference log-probabilities are fixed for the run); a batch carries
its samples' KL sequences packed in a row of their own.

Bad rows are skipped and counted by reason with their 1-based line or row, as ``prepare_datasets`` counts SFT rows
(``SourceReport``), and so are pairs longer than ``sequence_len`` in total: a batch row holds a whole pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kimitune.config import DatasetConfig
from kimitune.data.chat import FLAG_KEYS, IGNORE_INDEX, ConversationError, tokenize_conversation
from kimitune.data.packing import Batch, Sample, packed_batch, pack_epoch
from kimitune.data.report import SourceReport
from kimitune.data.rows import note_unread, read_rows
from kimitune.data.sources import DataError, check_mappings, open_source, role_aliases, row_to_conversation

Message = dict[str, Any]


@dataclass(frozen=True)
class _Layout:
    """Where a row keeps its prompt and replies."""

    prompt: str | None  # the prompt's key; None: the prompt is what precedes the replies' last messages
    prompt_required: bool
    replies: tuple[str, ...]  # (chosen, rejected) or (completion,)
    system: bool = True  # reads an optional ``system`` string


_PAIR_LAYOUTS = {
    "prompt_pairs": _Layout("prompt", True, ("chosen", "rejected")),
    "intel": _Layout("question", True, ("chosen", "rejected")),
    "icr": _Layout("input", True, ("chosen", "rejected")),
    "argilla": _Layout("instruction", True, ("chosen_response", "rejected_response")),
    "ultra": _Layout("prompt", True, ("chosen", "rejected")),
    "argilla_chat": _Layout(None, False, ("chosen", "rejected"), system=False),
}
_PAIR_TYPES = {f"{prefix}.{name}": layout for prefix in ("chatml", "llama3") for name, layout in _PAIR_LAYOUTS.items()}
_PAIR_TYPES["chat_template.argilla_chat"] = _PAIR_LAYOUTS["argilla_chat"]
_PAIR_TYPES["chat_template.argilla"] = _Layout("prompt", False, ("chosen", "rejected"))
_UNPAIRED_TYPES = {
    f"{prefix}.{name}": _Layout(prompt, True, ("completion",))
    for prefix in ("chatml", "llama3")
    for name, prompt in (("prompt_pairs", "prompt"), ("ultra", "prompt"), ("intel", "question"),
                         ("argilla", "instruction"))
}
_TEMPLATE_TYPES = ("chat_template", "chat_template.default")  # prompt under field_messages: read from the config
PREFERENCE_TYPES = (*_TEMPLATE_TYPES, *sorted(_PAIR_TYPES))
UNPAIRED_TYPES = (*_TEMPLATE_TYPES, *sorted(_UNPAIRED_TYPES))


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` and ``rejected`` are whole sequences (prompt + reply), labelled on the reply only."""

    chosen: Sample
    rejected: Sample


@dataclass(frozen=True)
class UnpairedSample:
    """One KTO example: a whole sequence (prompt + reply, labels on the reply), whether the reply is desirable, and
    (``with_kl_sequences``) its KL sequence: its prompt with another sample's reply."""

    sample: Sample
    desirable: bool
    kl: Sample | None = None


def _splice(prompt_of: Sample, reply_of: Sample, sequence_len: int) -> Sample:
    """``prompt_of``'s prompt tokens, then ``reply_of``'s reply tokens (its labels), at most ``sequence_len``."""
    p, r = _prompt_length(prompt_of), _prompt_length(reply_of)
    ids = np.concatenate([prompt_of.input_ids[:p], reply_of.input_ids[r:]])[:sequence_len]
    labels = np.concatenate([np.full(p, IGNORE_INDEX, dtype=prompt_of.labels.dtype), reply_of.labels[r:]])
    return Sample(ids, labels[:sequence_len])


def with_kl_sequences(samples: Sequence[UnpairedSample], sequence_len: int) -> list[UnpairedSample]:
    """``samples`` with their KL sequences: sample i's prompt and sample i - 1's reply (the last sample's for the
    first), TRL's mismatched pairing, cut to ``sequence_len`` tokens. A lone sample is its own partner."""
    return [UnpairedSample(s.sample, s.desirable, _splice(s.sample, samples[i - 1].sample, sequence_len))
            for i, s in enumerate(samples)]


def _layout(dataset_type: str, config: DatasetConfig, replies: tuple[str, ...], unpaired: bool) -> _Layout:
    if dataset_type in _TEMPLATE_TYPES:
        return _Layout(config.field_messages, False, replies, system=False)
    known = _UNPAIRED_TYPES if unpaired else _PAIR_TYPES
    if dataset_type not in known:
        kind, types = ("KTO", UNPAIRED_TYPES) if unpaired else ("preference", PREFERENCE_TYPES)
        raise DataError(f"type: {dataset_type!r} is not a {kind} row format; supported: {', '.join(types)}")
    return known[dataset_type]


def _messages(value: Any, key: str, role: str, config: DatasetConfig, aliases: Mapping[str, str],
              ignored: dict[str, None]) -> list[Message]:
    """A string (one ``role`` turn), a message or a list of messages, mapped as SFT maps a row's messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise ConversationError(f"{key} is not a string or messages", f"`{key}` is {type(value).__name__}")
    messages, _, unread = row_to_conversation({config.field_messages: value}, config, aliases)
    ignored.update(dict.fromkeys(unread))
    return messages


def _is_empty(message: Message) -> bool:
    if message.get("tool_calls"):
        return False
    content = message.get("content")
    if isinstance(content, list):  # a part that is not a text part is left for check_messages to name
        content = "".join(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return content is None or (isinstance(content, str) and not content.strip())


def _read_row(row: Any, layout: _Layout, config: DatasetConfig) -> tuple[list[Message], list[Message], list[str]]:
    """The row's prompt messages, its replies (in ``layout.replies`` order) and its unread message keys."""
    if not isinstance(row, Mapping):
        raise ConversationError("row is not an object", f"got {type(row).__name__}")
    aliases = role_aliases(config)
    ignored: dict[str, None] = {}  # an ordered set
    prompt = None
    if layout.prompt is not None and row.get(layout.prompt) is not None:
        prompt = _messages(row[layout.prompt], layout.prompt, "user", config, aliases, ignored)
    elif layout.prompt_required:
        raise ConversationError(f"missing {layout.prompt} field", f"no `{layout.prompt}` in the row")
    replies, earlier = [], []
    for key in layout.replies:
        if row.get(key) is None:
            raise ConversationError(f"missing {key} field", f"no `{key}` in the row")
        messages = _messages(row[key], key, "assistant", config, aliases, ignored)
        if not messages:
            raise ConversationError(f"empty {key}", f"`{key}` holds no message")
        if messages[-1].get("role") != "assistant":
            raise ConversationError(
                f"{key} does not end in an assistant message", f"its last role is {messages[-1].get('role')!r}"
            )
        if _is_empty(messages[-1]):
            raise ConversationError(f"empty {key}", f"the reply in `{key}` has no content")
        replies.append(messages[-1])
        earlier.append(messages[:-1])
    if prompt is None:
        if any(messages != earlier[0] for messages in earlier[1:]):
            raise ConversationError(
                f"{' and '.join(layout.replies)} prompts differ", "the messages before their last ones differ"
            )
        prompt = earlier[0]
    for key, messages in zip(layout.replies, earlier):
        # Row lists often repeat the user turn that `prompt` gives (ultra); anything else is a different prompt.
        if messages and prompt[len(prompt) - len(messages) :] != messages:
            raise ConversationError(f"{key} disagrees with the prompt", f"the messages before its reply in `{key}` "
                                    f"are not the end of the row's `{layout.prompt}`")
    if layout.system and row.get("system") is not None:
        if not isinstance(row["system"], str):
            raise ConversationError("system is not a string", f"`system` is {type(row['system']).__name__}")
        if row["system"]:  # datasets often hold "" for no system prompt
            prompt = [{"role": "system", "content": row["system"]}, *prompt]
    if not prompt:
        missing = layout.prompt is not None and row.get(layout.prompt) is None
        raise ConversationError(f"missing {layout.prompt} field" if missing else "empty prompt", "no prompt message")
    return prompt, replies, list(ignored)


def _at(where: str, err: ConversationError) -> ConversationError:
    """The same error (same reason, for the report) with the row named in its message."""
    detail = str(err).removeprefix(err.reason).removeprefix(": ")
    return ConversationError(err.reason, f"{where}: {detail}" if detail else where)


def row_to_preference(
    row: Mapping, dataset_type: str, config: DatasetConfig, where: str = "the row", *,
    field_chosen: str = "chosen", field_rejected: str = "rejected",
) -> tuple[list[Message], Message, Message]:
    """``(prompt_messages, chosen_reply, rejected_reply)`` of one row in the ``dataset_type`` layout (see the module
    docstring; ``field_chosen`` / ``field_rejected`` apply to ``chat_template.default``).

    Raises ``DataError`` for an unknown type, and ``ConversationError`` naming ``where`` and the field for a row that
    cannot be used (missing field, wrong type, empty reply, prompts that differ, chosen equal to rejected).
    """
    layout = _layout(dataset_type, config, (field_chosen, field_rejected), unpaired=False)
    prompt, (chosen, rejected), _ = _read_pair(row, layout, config, where)
    return prompt, chosen, rejected


def _read_pair(
    row: Any, layout: _Layout, config: DatasetConfig, where: str
) -> tuple[list[Message], list[Message], list[str]]:
    try:
        prompt, replies, ignored = _read_row(row, layout, config)
        if replies[0] == replies[1]:
            raise ConversationError(f"{' and '.join(layout.replies)} are the same", "the pair prefers nothing")
    except ConversationError as err:
        raise _at(where, err) from None
    return prompt, replies, ignored


def row_to_unpaired(
    row: Mapping, dataset_type: str, config: DatasetConfig, where: str = "the row"
) -> tuple[list[Message], Message, bool]:
    """``(prompt_messages, reply, desirable)`` of one KTO row; errors as ``row_to_preference``'s."""
    layout = _layout(dataset_type, config, ("completion",), unpaired=True)
    prompt, reply, desirable, _ = _read_unpaired(row, layout, config, where)
    return prompt, reply, desirable


def _read_unpaired(
    row: Any, layout: _Layout, config: DatasetConfig, where: str
) -> tuple[list[Message], Message, bool, list[str]]:
    try:
        prompt, (reply,), ignored = _read_row(row, layout, config)
        label = row.get("label")
        if label is None:
            raise ConversationError("missing label field", "no `label` in the row")
        if not isinstance(label, bool):
            raise ConversationError("label is not true/false", f"`label` is {label!r}")
    except ConversationError as err:
        raise _at(where, err) from None
    return prompt, reply, label, ignored


def tokenize_reply(tokenizer: Any, prompt: Sequence[Mapping], reply: Mapping, train_on_eos: str = "turn") -> Sample:
    """The whole sequence ``prompt + [reply]``: ``input_ids`` / ``labels`` ``[L]`` int32, labels only on the reply.

    The flags replace the messages' own ``train`` / ``weight`` (a reply's content parts keep theirs), so the prompt
    is masked exactly as ``tokenize_conversation`` masks an untrained message, whatever its roles.
    """
    def flagged(message: Mapping, train: bool) -> Message:
        return {**{k: v for k, v in message.items() if k not in FLAG_KEYS}, "train": train}

    messages = [*(flagged(m, False) for m in prompt), flagged(reply, True)]
    tokens = tokenize_conversation(tokenizer, messages, ("assistant",), train_on_eos)
    return Sample(np.asarray(tokens["input_ids"], np.int32), np.asarray(tokens["labels"], np.int32))


def _prompt_length(sample: Sample) -> int:
    return int(np.argmax(sample.labels != IGNORE_INDEX))  # tokenize_conversation refuses a sample with no label


def tokenize_pair(tokenizer: Any, prompt: Sequence[Mapping], chosen: Mapping, rejected: Mapping,
                  train_on_eos: str = "turn") -> PreferencePair:
    """Both whole sequences; raises ``ConversationError`` unless they share their prompt tokens."""
    pair = PreferencePair(tokenize_reply(tokenizer, prompt, chosen, train_on_eos),
                          tokenize_reply(tokenizer, prompt, rejected, train_on_eos))
    n_chosen, n_rejected = _prompt_length(pair.chosen), _prompt_length(pair.rejected)
    if n_chosen != n_rejected or not np.array_equal(pair.chosen.input_ids[:n_chosen],
                                                    pair.rejected.input_ids[:n_rejected]):
        # A template that renders the prompt differently by reply, or a BPE merge across the reply's start.
        raise ConversationError("chosen and rejected prompt tokens differ", f"chosen has {n_chosen} tokens before "
                                f"its first trained one, rejected {n_rejected}, and they must be the same tokens")
    return pair


def _tokenize_source(
    config: DatasetConfig, name: str, split: str, sequence_len: int, too_long: str, progress: Any,
    make: Callable[[Any, str], tuple[Any, list[Sample], list[str]]],
) -> tuple[list[Any], SourceReport]:
    """The entry's rows through ``kimitune.data.rows.read_rows``: ``make(row, where)`` gives an item, its samples and
    its unread keys, or raises ``ConversationError``; an item whose samples hold more than ``sequence_len`` tokens
    in all is skipped as ``too_long``."""
    try:
        check_mappings(config)
        role_aliases(config)
    except DataError as err:
        raise DataError(f"{name} {config.path}: {err}") from None

    def counted(row: Any, where: str, report: SourceReport) -> tuple[Any, list[Sample]]:
        item, samples, ignored = make(row, where)
        if sum(len(s) for s in samples) > sequence_len:
            raise ConversationError(too_long)
        note_unread(report, ignored, where)
        return item, samples

    return read_rows(open_source(config, name), split, progress, counted)


def tokenize_preference_rows(
    config: DatasetConfig, tokenizer: Any, sequence_len: int, dataset_type: str | None = None,
    name: str = "datasets[0]", split: str = "train", *, field_chosen: str = "chosen",
    field_rejected: str = "rejected", train_on_eos: str = "turn", progress: Any = None,
) -> tuple[list[PreferencePair], SourceReport]:
    """Every usable row of the entry's source (``open_source``: local files or a hub id) as a ``PreferencePair``.

    ``dataset_type`` defaults to ``config.type``; ``train_on_eos`` is the top-level setting (the entry's own wins);
    ``progress``: a ``rich.progress.Progress`` to advance, or None. A pair is kept when chosen + rejected hold at
    most ``sequence_len`` tokens. Raises ``DataError`` for an unknown type or mapping, or when no row is usable.
    """
    layout = _layout(dataset_type or config.type, config, (field_chosen, field_rejected), unpaired=False)
    eos = config.train_on_eos or train_on_eos

    def make(row: Any, where: str) -> tuple[PreferencePair, list[Sample], list[str]]:
        prompt, (chosen, rejected), ignored = _read_pair(row, layout, config, where)
        pair = tokenize_pair(tokenizer, prompt, chosen, rejected, eos)
        return pair, [pair.chosen, pair.rejected], ignored

    return _tokenize_source(config, name, split, sequence_len,
                            f"chosen + rejected longer than sequence_len ({sequence_len})", progress, make)


def tokenize_unpaired_rows(
    config: DatasetConfig, tokenizer: Any, sequence_len: int, dataset_type: str | None = None,
    name: str = "datasets[0]", split: str = "train", *, train_on_eos: str = "turn", progress: Any = None,
) -> tuple[list[UnpairedSample], SourceReport]:
    """Every usable KTO row as an ``UnpairedSample``; as ``tokenize_preference_rows``."""
    layout = _layout(dataset_type or config.type, config, ("completion",), unpaired=True)
    eos = config.train_on_eos or train_on_eos

    def make(row: Any, where: str) -> tuple[UnpairedSample, list[Sample], list[str]]:
        prompt, reply, desirable, ignored = _read_unpaired(row, layout, config, where)
        sample = tokenize_reply(tokenizer, prompt, reply, eos)
        return UnpairedSample(sample, desirable), [sample], ignored

    return _tokenize_source(config, name, split, sequence_len, f"longer than sequence_len ({sequence_len})",
                            progress, make)


def pairs_to_samples(pairs: Sequence[PreferencePair]) -> list[Sample]:
    """``[chosen 0, rejected 0, chosen 1, ...]``: pairs in the flat form ``kimitune.data.cache`` stores."""
    return [sample for pair in pairs for sample in (pair.chosen, pair.rejected)]


def samples_to_pairs(samples: Sequence[Sample]) -> list[PreferencePair]:
    """The inverse of ``pairs_to_samples``."""
    if len(samples) % 2:
        raise ValueError(f"samples_to_pairs: {len(samples)} samples are not whole pairs")
    return [PreferencePair(samples[i], samples[i + 1]) for i in range(0, len(samples), 2)]


@dataclass
class PreferenceBatch:
    """One packed micro-batch of whole pairs.

    ``input_ids`` / ``labels``: LongTensor ``[1, total]`` (labels -100 on prompts). ``cu_seqlens``: int32
    ``[2n + 1]``, pair k's chosen sequence between entries 2k and 2k + 1, its rejected between 2k + 1 and 2k + 2.
    ``pair_ids``: int64 ``[n]``, each pair's index in the list given (to look up cached reference log-probs).
    ``num_tokens`` and ``num_label_tokens`` as ``packing.Batch`` counts them. ``prompts``: n when the pairs share
    their prompts (``shared_prompts``; model/shared_prompts.py): the row then holds the n prompts, each without its
    last token, as its first n sequences, and pair k's chosen and rejected replies, each after that token, at
    sequences n + 2k and n + 2k + 1; 0 otherwise.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    pair_ids: torch.Tensor
    num_tokens: int
    num_label_tokens: int
    prompts: int = 0


@dataclass
class UnpairedBatch:
    """One packed micro-batch of KTO samples: as ``PreferenceBatch`` with one sequence per sample (``cu_seqlens``
    int32 ``[n + 1]``), ``desirable`` bool ``[n]``, ``sample_ids`` int64 ``[n]`` and ``kl``: the samples' KL sequences
    packed in the same order (a ``packing.Batch``; scored without gradients, never trained)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    desirable: torch.Tensor
    sample_ids: torch.Tensor
    num_tokens: int
    num_label_tokens: int
    kl: Batch


def _bins(lengths: list[int], sequence_len: int, what: str, seed: int, epoch: int) -> list[list[int]]:
    if not lengths:
        raise ValueError(f"no {what}s to batch")
    too_long = [i for i, length in enumerate(lengths) if length > sequence_len]
    if too_long:
        raise ValueError(f"{what} {too_long[0]} has {lengths[too_long[0]]} tokens > sequence_len {sequence_len}")
    return pack_epoch(lengths, sequence_len, seed, epoch)


def shared_prompt_parts(pair: PreferencePair, index: int) -> tuple[Sample, Sample, Sample]:
    """A pair as ``PreferenceBatch.prompts`` lays it out: (its prompt without the last token, that token + the
    chosen reply, that token + the rejected reply), labels on the replies as before."""
    p = _prompt_length(pair.chosen)
    if p < 2 or _prompt_length(pair.rejected) != p or \
            not np.array_equal(pair.chosen.input_ids[:p], pair.rejected.input_ids[:p]):
        raise ValueError(f"pair {index}: its chosen and rejected sequences do not share a prompt of two tokens or "
                         "more, which rl_shared_prompt needs")
    head = Sample(pair.chosen.input_ids[:p - 1], pair.chosen.labels[:p - 1])
    return head, *(Sample(s.input_ids[p - 1:], s.labels[p - 1:]) for s in (pair.chosen, pair.rejected))


def make_preference_batches(
    pairs: Sequence[PreferencePair], sequence_len: int, seed: int, epoch: int, row_multiple: int = 1,
    shared_prompts: bool = False,
) -> list[PreferenceBatch]:
    """One epoch of batches: pairs packed whole (chosen then rejected, side by side) into rows of at most
    ``sequence_len`` tokens by first-fit-decreasing on their total length; deterministic for ``(seed, epoch)``.
    ``row_multiple``: rows padded to a multiple of it (context parallelism), the padding a last sequence of its
    own, without labels, after the pairs. ``shared_prompts``: each pair's prompt once (``PreferenceBatch.prompts``),
    its length then counted once."""
    parts = [shared_prompt_parts(p, i) for i, p in enumerate(pairs)] if shared_prompts else None
    lengths = [sum(map(len, part)) for part in parts] if shared_prompts else \
        [len(p.chosen) + len(p.rejected) for p in pairs]
    bins = _bins(lengths, sequence_len, "pair", seed, epoch)
    batches = []
    for group in bins:
        if shared_prompts:
            samples = [parts[i][0] for i in group] + [s for i in group for s in parts[i][1:]]
        else:
            samples = pairs_to_samples([pairs[i] for i in group])
        packed = packed_batch(samples, None, 0, row_multiple)  # pads: no labels
        batches.append(PreferenceBatch(packed.input_ids, packed.labels, packed.cu_seqlens,
                                       torch.tensor(group, dtype=torch.int64), packed.num_tokens,
                                       packed.num_label_tokens, len(group) if shared_prompts else 0))
    return batches


def make_unpaired_batches(
    samples: Sequence[UnpairedSample], sequence_len: int, seed: int, epoch: int, row_multiple: int = 1
) -> list[UnpairedBatch]:
    """One epoch of KTO batches, packed (and padded) as ``make_preference_batches`` packs pairs; ``samples`` must
    have their KL sequences (``with_kl_sequences``)."""
    if any(s.kl is None for s in samples):
        raise ValueError("make_unpaired_batches: the samples need their KL sequences (with_kl_sequences)")
    bins = _bins([len(s.sample) for s in samples], sequence_len, "sample", seed, epoch)
    batches = []
    for group in bins:
        packed = packed_batch([samples[i].sample for i in group], None, 0, row_multiple)
        kl = packed_batch([samples[i].kl for i in group], None, 0, row_multiple)
        batches.append(UnpairedBatch(packed.input_ids, packed.labels, packed.cu_seqlens,
                                     torch.tensor([samples[i].desirable for i in group], dtype=torch.bool),
                                     torch.tensor(group, dtype=torch.int64), packed.num_tokens,
                                     packed.num_label_tokens, kl))
    return batches


def preference_examples(samples: Sequence[Sample], desirable: Sequence[bool] | None,
                        sequence_len: int) -> list[PreferencePair] | list[UnpairedSample]:
    """A prepared split (``PreparedData``) as what a preference run trains on: pairs (``samples`` in the flat form
    ``pairs_to_samples`` makes), or with ``desirable`` (KTO's labels, one per sample) the unpaired samples with
    their KL sequences."""
    if desirable is None:
        return samples_to_pairs(samples)
    if len(desirable) != len(samples):
        raise ValueError(f"{len(desirable)} KTO labels for {len(samples)} samples")
    return with_kl_sequences([UnpairedSample(s, bool(d)) for s, d in zip(samples, desirable)], sequence_len)


def make_example_batches(examples: Sequence[PreferencePair] | Sequence[UnpairedSample], sequence_len: int, seed: int,
                         epoch: int, row_multiple: int = 1,
                         shared_prompts: bool = False) -> list[PreferenceBatch] | list[UnpairedBatch]:
    """One epoch of ``preference_examples``' batches: ``make_unpaired_batches`` for KTO's samples, else
    ``make_preference_batches`` (``shared_prompts`` as it takes it)."""
    if examples and isinstance(examples[0], UnpairedSample):
        return make_unpaired_batches(examples, sequence_len, seed, epoch, row_multiple)
    return make_preference_batches(examples, sequence_len, seed, epoch, row_multiple, shared_prompts)
