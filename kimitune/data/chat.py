"""One conversation to ``input_ids`` and ``labels``: the tokenizer's chat template renders, prefixes locate spans.

The token ids are exactly ``tokenizer.apply_chat_template(messages, tools=tools)``. Which of them are trained is found
from the template itself, never by searching for a message's text:

1. Render ``messages[:i]`` and ``messages[:i+1]``; the second must extend the first (the template is prefix-stable),
   and the difference is message ``i``'s segment (plus anything the template adds with it, e.g. a default system
   turn before the first message or the tool declarations).
2. Render ``messages[:i]`` plus message ``i`` with its content replaced by two different one-character sentinels
   (and its tool calls removed). Their common prefix is the segment's header (everything before the content), their
   common suffix is its footer (``<|im_end|>`` in Kimi's format). What the real segment holds between the two is
   the message's body: its content and, for an assistant, its tool calls. The footer is its end of turn.
3. Where content given as a list of parts has parts whose flags decide differently from their message, render the
   message once more with a marker character (one the segment does not hold) before and after each part's text.
   The rendering without the markers must be the real segment, each marker must appear once and in order, and each
   part must lie inside the body; the markers' places are then the parts' character ranges.
4. Character cuts become token cuts by tokenizing the text between consecutive cuts and checking that the pieces
   reproduce the full token sequence. Where a BPE merge crosses a cut (no special token separates the two sides),
   the tokens that straddle the cut belong to neither side and are never trained.

Training flags, as Axolotl's ``chat_template`` reads them: a message's ``train`` or ``weight`` (true/false or 0/1;
when both are given they must agree) overrides the role rule (role in ``roles_to_train``). A content part's ``train``
or ``weight`` decides its own text; a part without one follows its message. An explicit false on the message masks
the whole message, whatever its parts say. The rest of the body (tool calls, anything the template puts between
parts) follows the message. A token is trained when it lies wholly inside trained body text; where a BPE merge
crosses a boundary between trained and masked text, the straddling token is masked.

A message is trained when its own decision or any of its parts is. Trained are the trained body text and, per
``train_on_eos``, the end-of-turn tokens of trained messages: ``"turn"`` every trained message's, ``"last"`` only the
last trained message's, ``"none"`` none. The end-of-turn tokens are the footer's tokens up to and including the
tokenizer's eos token (all of them when the footer holds none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON_EOS = ("turn", "last", "none")
FLAG_KEYS = ("train", "weight")  # a message's or a content part's training flag
_SENTINELS = ("\ue000", "\ue001")  # private-use characters: different first and last characters
_MARKERS = range(0xE000, 0xF900)  # the private-use area: part markers are picked from it


class ConversationError(ValueError):
    """A conversation that cannot be tokenised. ``reason`` is short and stable: the bad-row report counts by it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def check_messages(messages: Any, tools: Any = None) -> None:
    """Raises ``ConversationError`` naming the first problem in an OpenAI-style message list (and its tools)."""
    if not isinstance(messages, list):
        raise ConversationError("messages is not a list", f"got {type(messages).__name__}")
    if not messages:
        raise ConversationError("empty conversation")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise ConversationError("tools is not a list of objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConversationError("message is not a mapping", f"message {i} is {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise ConversationError("missing role", f"message {i}")
        if role not in ROLES:
            raise ConversationError("unknown role", f"message {i} has role {role!r}; known: {', '.join(ROLES)}")
        _check_content(message, i)
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            _check_tool_calls(tool_calls, role, i)
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise ConversationError(f"{key} is not a string", f"message {i}")
        training_flag(message, f"message {i}")


def _check_content(message: Mapping, i: int) -> None:
    content = message.get("content")
    if content is None:
        if message["role"] == "assistant" and message.get("tool_calls"):
            return
        raise ConversationError("missing content", f"message {i} ({message['role']})")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ConversationError("content of the wrong type", f"message {i} has {type(content).__name__}")
    for k, part in enumerate(content):
        if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ConversationError(
                "content of the wrong type", f"message {i}: parts must be {{'type': 'text', 'text': str}}"
            )
        training_flag(part, f"message {i} part {k}")


def training_flag(item: Mapping, where: str) -> bool | None:
    """The ``train`` / ``weight`` flag of a message or content part: True, False, or None when it has neither.

    Each must be true/false or 0/1 (Axolotl reads ShareGPT's ``weight: 0`` as false); raises ``ConversationError``
    for another value (a fractional weight would scale the loss, which kimitune does not do) or for two that disagree.
    """
    flags = {}
    for key in FLAG_KEYS:
        value = item.get(key)
        if value is None:
            continue
        if not (isinstance(value, (bool, int, float)) and value in (0, 1)):
            raise ConversationError("train flag is not true/false/0/1", f"{where} has {key}={value!r}")
        flags[key] = bool(value)
    if len(set(flags.values())) > 1:
        raise ConversationError(
            "train and weight disagree", f"{where} has train={item['train']!r}, weight={item['weight']!r}"
        )
    return next(iter(flags.values()), None)


def _check_tool_calls(tool_calls: Any, role: str, i: int) -> None:
    if role != "assistant":
        raise ConversationError("tool_calls outside an assistant message", f"message {i} ({role})")
    if not isinstance(tool_calls, list):
        raise ConversationError("bad tool_calls", f"message {i}: tool_calls is {type(tool_calls).__name__}")
    for call in tool_calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        ok = (
            isinstance(function, Mapping)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), (str, Mapping))
            and isinstance(call.get("id", ""), str)
        )
        if not ok:
            raise ConversationError(
                "bad tool_calls", f"message {i}: each call needs function.name (str) and function.arguments"
            )


@dataclass(frozen=True)
class _Span:
    """Character ranges of one message in the full rendering: its body, its footer (end of turn) and, where the
    flags need them, its content parts."""

    body: tuple[int, int]
    footer: tuple[int, int]
    parts: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class _Decision:
    """What one message trains: its body text outside the parts, each content part (None: every part as the body)
    and whether the message is trained (its end of turn follows ``train_on_eos``)."""

    body: bool
    parts: tuple[bool, ...] | None
    trained: bool


def _decide(message: Mapping, roles_to_train: Sequence[str], use_flags: bool = True) -> _Decision:
    """The role rule and, with ``use_flags``, the message's and its parts' flags (see the module docstring)."""
    body = message["role"] in roles_to_train
    if not use_flags:
        return _Decision(body, None, body)
    flag = training_flag(message, "the message")
    body = flag if flag is not None else body
    content = message.get("content")
    if flag is False or not isinstance(content, list):
        return _Decision(body, None, body)
    flags = [training_flag(part, "the part") if part["text"] else None for part in content]
    parts = tuple(body if part_flag is None else part_flag for part_flag in flags)
    if all(part == body for part in parts):
        return _Decision(body, None, body)
    return _Decision(body, parts, body or any(parts))


def _render(tokenizer: Any, messages: Sequence[Mapping], tools: list | None) -> str:
    if not messages:  # apply_chat_template refuses an empty list; nothing rendered is the empty prefix
        return ""
    try:
        return tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False)
    except Exception as err:  # the template's own raise_exception(), or a Jinja/type error on this data
        raise ConversationError("chat template error", f"{type(err).__name__}: {err}") from err


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[len(a) - 1 - i] == b[len(b) - 1 - i]:
        i += 1
    return i


def _segment(rendered: str, prefix: str, i: int) -> str:
    if not rendered.startswith(prefix):
        raise ConversationError(
            "chat template is not prefix-stable",
            f"rendering messages[:{i + 1}] does not start with the rendering of messages[:{i}]",
        )
    return rendered[len(prefix) :]


def _message_spans(
    tokenizer: Any, messages: list[Mapping], tools: list | None, with_parts: set[int]
) -> tuple[str, list[_Span]]:
    """The full rendering and each message's body and footer character ranges in it, and its parts' for the
    messages in ``with_parts`` (see the module docstring)."""
    spans = []
    prefix = ""
    for i, message in enumerate(messages):
        rendered = _render(tokenizer, messages[: i + 1], tools)
        segment = _segment(rendered, prefix, i)
        variants = []
        for sentinel in _SENTINELS:
            variant = {k: v for k, v in message.items() if k != "tool_calls"}
            variant["content"] = sentinel
            variants.append(_segment(_render(tokenizer, [*messages[:i], variant], tools), prefix, i))
        head = _common_prefix(*variants)
        tail = _common_suffix(variants[0][head:], variants[1][head:])
        header, footer = variants[0][:head], variants[0][len(variants[0]) - tail :]
        if len(segment) < head + tail or not segment.startswith(header) or not segment.endswith(footer):
            raise ConversationError(
                "chat template cannot be split", f"message {i}: its rendering does not keep the template's header"
            )
        start, end = len(prefix), len(rendered)
        body = (start + head, end - tail)
        parts = _part_spans(tokenizer, messages, tools, i, prefix, segment, body) if i in with_parts else ()
        spans.append(_Span(body=body, footer=(end - tail, end), parts=parts))
        prefix = rendered
    return prefix, spans


def _part_spans(
    tokenizer: Any, messages: list[Mapping], tools: list | None, i: int, prefix: str, segment: str,
    body: tuple[int, int],
) -> tuple[tuple[int, int], ...]:
    """Character ranges of message ``i``'s content parts in the full rendering (step 3 of the module docstring)."""
    parts = messages[i]["content"]
    used = set(segment)
    markers = [c for c in map(chr, _MARKERS) if c not in used][: 2 * len(parts)]
    if len(markers) < 2 * len(parts):
        raise ConversationError("chat template cannot be split", f"message {i}: too many content parts to mark")
    marked = dict(messages[i])
    marked["content"] = [
        {**part, "text": markers[2 * k] + part["text"] + markers[2 * k + 1]} for k, part in enumerate(parts)
    ]
    variant = _segment(_render(tokenizer, [*messages[:i], marked], tools), prefix, i)
    marker_set = set(markers)
    places = [place for place, c in enumerate(variant) if c in marker_set]
    cuts = [len(prefix) + place - k for k, place in enumerate(places)]  # each marker's place once they are removed
    spans = tuple(zip(cuts[0::2], cuts[1::2]))
    located = (
        [variant[place] for place in places] == markers
        and "".join(c for c in variant if c not in marker_set) == segment
        and all(body[0] <= a and b <= body[1] for a, b in spans)
    )
    if not located:
        raise ConversationError(
            "chat template cannot be split", f"message {i}: its content parts cannot be located in its rendering"
        )
    return spans


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _token_cuts(tokenizer: Any, text: str, ids: list[int], cuts: list[int]) -> dict[int, tuple[int, int]]:
    """Maps each character cut (ascending) to ``(end, start)``: tokens ``[0, end)`` lie wholly before the cut and
    tokens ``[start, len(ids))`` wholly after it. ``end == start`` when the cut is a token boundary.

    Pieces between clean cuts are tokenised on their own; a piece that reproduces the next tokens of ``ids`` proves
    the cut clean. Otherwise the common prefix (suffix) of ``ids`` with the tokens of the text before (after) the cut
    bounds the tokens that may straddle it, and decoding places the token boundaries between those bounds: a boundary
    ``k`` lies at character ``len(decode(ids[:k]))`` when that decoding is a prefix of the text (a boundary inside a
    character, or a decoder that does not give the text back, keeps the bounds).
    """
    bounds: dict[int, tuple[int, int]] = {}
    clean_char, clean_token = 0, 0
    for cut in cuts:
        piece = _encode(tokenizer, text[clean_char:cut])
        if ids[clean_token : clean_token + len(piece)] == piece:
            clean_char, clean_token = cut, clean_token + len(piece)
            bounds[cut] = (clean_token, clean_token)
            continue
        before = _encode(tokenizer, text[:cut])
        end = _common_prefix(before, ids)
        if end == len(before):
            clean_char, clean_token = cut, end
            bounds[cut] = (end, end)
            continue
        start = max(end, len(ids) - _common_suffix(_encode(tokenizer, text[cut:]), ids))
        places = {k: _boundary_place(tokenizer, text, ids, k) for k in range(end + 1, start)}
        end = max([end, *(k for k, place in places.items() if place is not None and place <= cut)])
        start = min([start, *(k for k, place in places.items() if place is not None and place >= cut and k >= end)])
        if end == start:
            clean_char, clean_token = cut, end
        bounds[cut] = (end, start)
    return bounds


def _boundary_place(tokenizer: Any, text: str, ids: list[int], k: int) -> int | None:
    """The character position of the boundary before token ``k``, or None when decoding does not tell it."""
    decoded = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return len(decoded) if text.startswith(decoded) else None


def tokenize_conversation(
    tokenizer: Any,
    messages: list[Mapping],
    roles_to_train: Sequence[str] = ("assistant",),
    train_on_eos: str = "turn",
    tools: list | None = None,
) -> dict[str, list[int]]:
    """Tokenises a conversation through the tokenizer's chat template.

    Returns ``{"input_ids": [T], "labels": [T], "flag_masked": [...]}``: labels equal input_ids on trained tokens
    and are -100 elsewhere (unshifted); ``flag_masked`` lists, ascending, the positions that the role rule alone
    would train and that the messages' and parts' ``train`` / ``weight`` flags mask. Raises ``ConversationError``
    for a malformed conversation, a template it cannot split, or a conversation with no trained token.
    """
    check_messages(messages, tools)
    if train_on_eos not in TRAIN_ON_EOS:
        raise ValueError(f"train_on_eos must be one of {TRAIN_ON_EOS}, got {train_on_eos!r}")
    decisions = [_decide(message, roles_to_train) for message in messages]
    plain = [_decide(message, roles_to_train, use_flags=False) for message in messages]
    with_parts = {i for i, decision in enumerate(decisions) if decision.parts is not None}
    text, spans = _message_spans(tokenizer, messages, tools, with_parts)
    input_ids = _encode(tokenizer, text)
    runs = [_trained_runs(span, decision) for span, decision in zip(spans, decisions)]
    plain_runs = [_trained_runs(span, decision) for span, decision in zip(spans, plain)]
    cuts = {c for message_runs in (*runs, *plain_runs) for run in message_runs for c in run}
    for span, decision, plain_decision in zip(spans, decisions, plain):
        if decision.trained or plain_decision.trained:
            cuts.update((span.body[1], span.footer[1]))
    bounds = _token_cuts(tokenizer, text, input_ids, sorted(cuts))
    labels = _labels(input_ids, bounds, spans, runs, decisions, train_on_eos, tokenizer.eos_token_id)
    if all(label == IGNORE_INDEX for label in labels):
        raise ConversationError("no trainable token", f"roles_to_train={list(roles_to_train)}")
    plain_labels = labels
    if plain != decisions:
        plain_labels = _labels(input_ids, bounds, spans, plain_runs, plain, train_on_eos, tokenizer.eos_token_id)
    flag_masked = [p for p, (label, plain_label) in enumerate(zip(labels, plain_labels)) if label < 0 <= plain_label]
    return {"input_ids": input_ids, "labels": labels, "flag_masked": flag_masked}


def _trained_runs(span: _Span, decision: _Decision) -> list[tuple[int, int]]:
    """Character ranges of a message's trained body text, adjacent trained pieces joined into one range."""
    start, end = span.body
    if decision.parts is None:
        return [(start, end)] if decision.body else []
    pieces, position = [], start
    for (part_start, part_end), part in zip(span.parts, decision.parts):
        pieces += [(position, part_start, decision.body), (part_start, part_end, part)]
        position = part_end
    pieces.append((position, end, decision.body))
    runs: list[tuple[int, int]] = []
    for a, b, trained in pieces:
        if not trained or a == b:
            continue
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def _labels(
    ids: list[int], bounds: dict[int, tuple[int, int]], spans: list[_Span], runs: list[list[tuple[int, int]]],
    decisions: list[_Decision], train_on_eos: str, eos_token_id: int | None,
) -> list[int]:
    """Labels ``[T]``: the tokens wholly inside trained runs and the selected messages' end-of-turn tokens."""
    trained = [i for i, decision in enumerate(decisions) if decision.trained]
    eos_turns = set({"turn": trained, "last": trained[-1:], "none": []}[train_on_eos])
    labels = [IGNORE_INDEX] * len(ids)
    for i in trained:
        for a, b in runs[i]:
            for position in range(bounds[a][1], bounds[b][0]):
                labels[position] = ids[position]
        if i in eos_turns:
            body_end, footer_end = spans[i].body[1], spans[i].footer[1]
            for position in _end_of_turn(ids, bounds[body_end][1], bounds[footer_end][0], eos_token_id):
                labels[position] = ids[position]
    return labels


def _end_of_turn(ids: list[int], start: int, end: int, eos_token_id: int | None) -> range:
    """Footer tokens ``[start, end)`` up to and including the first eos token (all of them if it has none)."""
    for position in range(start, end):
        if ids[position] == eos_token_id:
            return range(start, position + 1)
    return range(start, end)
