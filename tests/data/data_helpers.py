"""Helpers for the data tests: an independent renderer of Kimi's chat format and random conversations."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "examples" / "tokenizer"
DATA_DIR = REPO / "examples" / "data"
MARKERS = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}


def reference_render(messages, tools=None, default_system=None, parts=False):
    """Kimi's format written out by hand, as ../shared/reference/README.md and the tokenizer docs describe it.

    Returns ``(text, spans)``: ``spans[i] = (body_start, body_end, footer_end)`` character positions of message i.
    With ``parts=True`` it returns ``(text, spans, part_spans)``, ``part_spans[i]`` the ``(start, end)`` of each content
    part of message i (empty for string content).
    """
    text = ""
    if tools:
        text += "<|im_system|>tool_declare<|im_middle|>" + json.dumps(tools, separators=(",", ":")) + "<|im_end|>"
    spans, part_spans = [], []
    for i, message in enumerate(messages):
        if i == 0 and default_system is not None and message["role"] != "system":
            text += "<|im_system|>system<|im_middle|>" + default_system + "<|im_end|>"
        role = message["role"]
        text += MARKERS.get(role, "<|im_system|>") + (message.get("name") or role) + "<|im_middle|>"
        if role == "tool" and message.get("tool_call_id") is not None:
            text += f"## Return of {message['tool_call_id']}\n"
        body_start = len(text)
        content = message.get("content")
        part_spans.append([])
        if isinstance(content, str):
            text += content
        for part in content if isinstance(content, list) else []:
            part_spans[-1].append((len(text), len(text) + len(part["text"])))
            text += part["text"]
        if role == "assistant" and message.get("tool_calls"):
            text += "<|tool_calls_section_begin|>"
            for index, call in enumerate(message["tool_calls"]):
                function = call["function"]
                call_id = call.get("id", f"functions.{function['name']}:{index}")
                arguments = function["arguments"]
                arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
                text += f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"
            text += "<|tool_calls_section_end|>"
        body_end = len(text)
        text += "<|im_end|>"
        spans.append((body_start, body_end, len(text)))
    return (text, spans, part_spans) if parts else (text, spans)


def flag(item):
    """An item's train/weight flag as Axolotl reads it (0/1 as false/true); None when it has neither."""
    values = [bool(item[key]) for key in ("train", "weight") if item.get(key) is not None]
    return values[0] if values else None


def expected_labels(tokenizer, messages, roles_to_train, train_on_eos, tools=None, default_system=None):
    """Labels from character offsets: a token is trained when every character of it is trained body text, or when
    it is the end-of-turn token of a trained message that train_on_eos selects.

    Body text is trained by its message's flag, else its role; a non-empty content part's text by its own flag,
    else its message's, unless the message's flag is false. A message is trained when its body or a part is."""
    text, spans, part_spans = reference_render(messages, tools, default_system, parts=True)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    trained_char = [False] * len(text)
    trained = []
    for i, message in enumerate(messages):
        body_start, body_end, _ = spans[i]
        base = flag(message) if flag(message) is not None else message["role"] in roles_to_train
        trained_char[body_start:body_end] = [base] * (body_end - body_start)
        any_part = False
        for part, (start, end) in zip(message["content"] if isinstance(message.get("content"), list) else [],
                                      part_spans[i]):
            part_trained = base if flag(part) is None or flag(message) is False else flag(part)
            trained_char[start:end] = [part_trained] * (end - start)
            any_part |= part_trained and start < end
        if base or any_part:
            trained.append(i)
    eos_turns = {"turn": trained, "last": trained[-1:], "none": []}[train_on_eos]
    labels = [-100] * len(ids)
    for k, (start, end) in enumerate(offsets):
        in_body = start < end and all(trained_char[start:end])
        is_eot = any((start, end) == spans[i][1:] for i in eos_turns)
        if in_body or is_eot:
            labels[k] = ids[k]
    return text, ids, labels


SPECIAL_STRINGS = ["<|im_end|>", "<|im_user|>", "<|im_middle|>", "[PAD]", "## Return of x\n", "\ue000", "\ue001"]
_fragment = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=" \t\n\r", max_size=4),
    st.sampled_from(["", "cat=red", "a", "Hello", "東京", "😀", " x", "\n\n", *SPECIAL_STRINGS]),
)
_text = st.lists(_fragment, max_size=4).map("".join)
_flag_value = st.sampled_from([True, False, 0, 1])
_flags = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"train": _flag_value}),
    st.fixed_dictionaries({"weight": st.sampled_from([0, 1])}),
    st.booleans().map(lambda b: {"train": b, "weight": int(b)}),
)
_part = st.builds(lambda t, flags: {"type": "text", "text": t, **flags}, _text, _flags)
_parts = st.lists(_part, min_size=0, max_size=3)
_tool_call = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {
                "name": st.sampled_from(["get_weather", "f"]),
                "arguments": st.one_of(_text, st.dictionaries(st.sampled_from(["city", "n"]), _text, max_size=2)),
            }
        ),
    },
    optional={"id": st.sampled_from(["call_0", "functions.f:1", ""])},
)


@st.composite
def messages_strategy(draw, min_size=1, max_size=6):
    """Random OpenAI-style conversations: any role order, unicode, whitespace, special-token strings, repeated and
    empty contents, lists of text parts, names, tool calls and results, train/weight flags (true/false,
    0/1) on messages and parts."""
    messages = []
    for _ in range(draw(st.integers(min_size, max_size))):
        role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
        message = {"role": role, "content": draw(st.one_of(_text, _parts, st.sampled_from(["same", ""])))}
        if draw(st.booleans()) and draw(st.booleans()):
            message["name"] = draw(st.sampled_from(["alice", "get_weather", ""]))
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = draw(st.lists(_tool_call, min_size=1, max_size=2))
            if draw(st.booleans()):
                del message["content"]
        if role == "tool" and draw(st.booleans()):
            message["tool_call_id"] = draw(st.sampled_from(["functions.get_weather:0", "call_0", ""]))
        if draw(st.integers(0, 3)) == 0:
            message.update(draw(_flags))
        messages.append(message)
    return messages


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
