"""tokenize_conversation: token ids equal apply_chat_template's; labels exactly the trained bodies and ends of turn.

The reference for the labels is independent of the implementation: a hand-written renderer of Kimi's format gives
each message's body and end-of-turn character ranges, and the fast tokenizer's character offsets say which tokens
lie wholly inside them.
"""

from __future__ import annotations

import pytest
from conftest import DEFAULT_SYSTEM
from data_helpers import TOOLS, expected_labels, messages_strategy, reference_render
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimitune.data import ConversationError, load_tokenizer, tokenize_conversation
from kimitune.data.chat import IGNORE_INDEX

ROLE_SETS = st.sampled_from([("assistant",), ("user", "assistant"), ("system", "user", "assistant", "tool"), ()])
EOS = st.sampled_from(["turn", "last", "none"])
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_against_reference(tokenizer, messages, roles, train_on_eos, tools, default_system=None):
    text, ids, labels = expected_labels(tokenizer, messages, roles, train_on_eos, tools, default_system)
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == text
    if all(label == IGNORE_INDEX for label in labels):
        with pytest.raises(ConversationError, match="no trainable token"):
            tokenize_conversation(tokenizer, messages, roles, train_on_eos, tools)
        return
    out = tokenize_conversation(tokenizer, messages, roles, train_on_eos, tools)
    assert out["input_ids"] == tokenizer.apply_chat_template(messages, tools=tools)["input_ids"] == ids
    assert out["labels"] == labels


@SETTINGS
@given(messages=messages_strategy(), roles=ROLE_SETS, train_on_eos=EOS, with_tools=st.booleans())
def test_labels_match_the_reference(tokenizer, messages, roles, train_on_eos, with_tools):
    check_against_reference(tokenizer, messages, roles, train_on_eos, TOOLS if with_tools else None)


@SETTINGS
@given(messages=messages_strategy(), roles=ROLE_SETS, train_on_eos=EOS)
def test_default_system_turn_is_never_trained(default_system_tokenizer, messages, roles, train_on_eos):
    check_against_reference(default_system_tokenizer, messages, roles, train_on_eos, None, DEFAULT_SYSTEM)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=messages_strategy(), with_tools=st.booleans())
def test_special_tokens_split_every_body_cleanly(tokenizer, messages, with_tools):
    """Where special tokens delimit a body (every message but a tool result with its '## Return of' header), the
    full token sequence is exactly the tokens of each piece tokenised alone: no BPE merge crosses a boundary."""
    tools = TOOLS if with_tools else None
    text, spans = reference_render(messages, tools)
    ids = tokenizer.encode(text, add_special_tokens=False)
    cuts = sorted({0, len(text), *(c for span in spans for c in span)})
    pieces = [tokenizer.encode(text[a:b], add_special_tokens=False) for a, b in zip(cuts[:-1], cuts[1:])]
    if not any(m["role"] == "tool" and "tool_call_id" in m for m in messages):
        assert [t for piece in pieces for t in piece] == ids
    for message, (body_start, body_end, footer_end) in zip(messages, spans):
        assert tokenizer.encode(text[body_end:footer_end], add_special_tokens=False) == [tokenizer.eos_token_id]


def test_assistant_only_example(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "cat=red. What is cat?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "red"},
        {"role": "assistant", "content": "red"},
    ]
    out = tokenize_conversation(tokenizer, messages)
    trained = [tokenizer.convert_ids_to_tokens(t) for t, label in zip(out["input_ids"], out["labels"]) if label >= 0]
    assert trained == ["red", "<|im_end|>", "red", "<|im_end|>"]
    # The user's identical "red" is not trained: spans come from the template, not from searching the text.
    user_red = out["input_ids"].index(tokenizer.convert_tokens_to_ids("red"))
    assert out["labels"][user_red] == IGNORE_INDEX


@pytest.mark.parametrize(
    ("train_on_eos", "expected"),
    [("turn", ["a", "<|im_end|>", "b", "<|im_end|>"]), ("last", ["a", "b", "<|im_end|>"]), ("none", ["a", "b"])],
)
def test_train_on_eos(tokenizer, train_on_eos, expected):
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "b"},
    ]
    out = tokenize_conversation(tokenizer, messages, train_on_eos=train_on_eos)
    assert [tokenizer.convert_ids_to_tokens(t) for t, l in zip(out["input_ids"], out["labels"]) if l >= 0] == expected


def test_train_flag_overrides_the_role_rule(tokenizer):
    messages = [
        {"role": "user", "content": "x", "train": True},
        {"role": "assistant", "content": "y", "train": False},
        {"role": "assistant", "content": "z"},
    ]
    out = tokenize_conversation(tokenizer, messages)
    assert [tokenizer.convert_ids_to_tokens(t) for t, l in zip(out["input_ids"], out["labels"]) if l >= 0] == [
        "x", "<|im_end|>", "z", "<|im_end|>",
    ]


def U(content, **flags):
    return {"role": "user", "content": content, **flags}


def A(content, **flags):
    return {"role": "assistant", "content": content, **flags}


def P(text, **flags):
    return {"type": "text", "text": text, **flags}


def trained_tokens(tokenizer, out):
    """``[(position, token)]`` of every trained position."""
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    return [(p, tokens[p]) for p, label in enumerate(out["labels"]) if label != IGNORE_INDEX]


def test_issue_example_masks_the_flagged_part(tokenizer):
    """Issue 27's example: the reasoning part (weight 0) is masked, the answer part and its end of turn trained."""
    messages = [U("2+2?"), A([P("Let me think: 2 and 2.", weight=0), P(" The answer is 4.", train=True)])]
    out = tokenize_conversation(tokenizer, messages)
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert tokens[11:27] == [
        "L", "et", "Ġm", "e", "Ġthink", ":", "Ġ2", "Ġand", "Ġ2", ".",  # the masked part, positions 11-20
        "ĠThe", "Ġanswer", "Ġis", "Ġ4", ".", "<|im_end|>",  # the trained part and the end of turn, 21-26
    ]
    assert out["labels"] == [t if 21 <= p <= 26 else IGNORE_INDEX for p, t in enumerate(out["input_ids"])]
    assert out["flag_masked"] == list(range(11, 21))
    assert tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX]) == " The answer is 4.<|im_end|>"


@pytest.mark.parametrize(
    ("messages", "train_on_eos", "trained", "flag_masked"),
    [
        pytest.param(  # a part without a flag follows its message; a flagged part of an untrained user turn trains
            [U([P("a"), P("b", train=True)]), A("d")], "turn",
            [(4, "b"), (5, "<|im_end|>"), (9, "d"), (10, "<|im_end|>")], [], id="unflagged-part-follows-message",
        ),
        pytest.param(  # an explicit false on the message masks the whole message, whatever its parts say
            [U("q"), A([P("c", train=True)], train=False), A("d")], "turn",
            [(13, "d"), (14, "<|im_end|>")], [8, 9], id="message-false-beats-part-true",
        ),
        pytest.param(  # 0/1 message flags, train and weight: a user turn trained with 1, an assistant masked with 0
            [U([P("q"), P("r", weight=0)], train=1), A("d", weight=0), A("e", weight=1)], "turn",
            [(3, "q"), (5, "<|im_end|>"), (14, "e"), (15, "<|im_end|>")], [9, 10], id="zero-one-message-flags",
        ),
        pytest.param(  # every part masked: the message is still trained (its role says so), so its end of turn is
            [U("q"), A([P("x", weight=0), P("y", train=False)])], "turn",
            [(10, "<|im_end|>")], [8, 9], id="all-parts-masked",
        ),
        pytest.param(  # trained parts side by side are one trained text: "Hel" + "lo" merge into "Hell", trained
            [U("q"), A([P("Hel", train=True), P("lo"), P("!", weight=0)])], "turn",
            [(8, "Hell"), (9, "o"), (11, "<|im_end|>")], [10], id="adjacent-trained-parts-join",
        ),
        pytest.param(  # a space at the end of the masked part merges into " The", which straddles and is masked
            [U("2+2?"), A([P("Let me think: ", weight=0), P("The answer is 4.")])], "turn",
            [(18, "Ġanswer"), (19, "Ġis"), (20, "Ġ4"), (21, "."), (22, "<|im_end|>")], list(range(11, 18)),
            id="straddling-token-masked",
        ),
        pytest.param(  # "last" is the last trained message as the flags decide
            [U("q"), A("a"), U("q"), A([P("b", train=0)], train=False)], "last",
            [(8, "a"), (9, "<|im_end|>")], [18, 19], id="last-follows-flags",
        ),
    ],
)
def test_part_and_message_flags(tokenizer, messages, train_on_eos, trained, flag_masked):
    out = tokenize_conversation(tokenizer, messages, train_on_eos=train_on_eos)
    assert trained_tokens(tokenizer, out) == trained
    assert out["flag_masked"] == flag_masked


def test_tool_calls_follow_the_message_not_its_parts(tokenizer):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [U("q"), {"role": "assistant", "content": [P("x", weight=0)], "tool_calls": [call]}]
    out = tokenize_conversation(tokenizer, messages)
    assert out["flag_masked"] == [8]  # the "x"
    assert tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX]) == (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}"
        "<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
    )


def tokenizer_rendering_parts_as(parts: str):
    """The tiny tokenizer with a template that renders list content as the Jinja expression ``parts``."""
    from data_helpers import TOKENIZER_DIR

    template = (
        "{% for m in messages %}{{ '<|im_assistant|>' + m.role + '<|im_middle|>' }}"
        "{% if m.content is string %}{{ m.content }}{% else %}{{ " + parts + " }}"
        "{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    )
    return load_tokenizer(str(TOKENIZER_DIR), chat_template=template)


def test_text_a_template_puts_between_parts_follows_the_message():
    tokenizer = tokenizer_rendering_parts_as("m.content | map(attribute='text') | join('\n')")
    out = tokenize_conversation(tokenizer, [A([P("a"), P("b", weight=0), P("c")])])
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert tokens == ["<|im_assistant|>", "assistant", "<|im_middle|>", "a", "Ċ", "b", "Ċ", "c", "<|im_end|>"]
    assert trained_tokens(tokenizer, out) == [(3, "a"), (4, "Ċ"), (6, "Ċ"), (7, "c"), (8, "<|im_end|>")]
    assert out["flag_masked"] == [5]


def test_parts_a_template_does_not_render_are_refused():
    tokenizer = tokenizer_rendering_parts_as("m.content[0].text")
    with pytest.raises(ConversationError, match="content parts cannot be located") as err:
        tokenize_conversation(tokenizer, [A([P("a"), P("b", weight=0)])])
    assert err.value.reason == "chat template cannot be split"


def test_tool_calls_are_part_of_the_trained_body(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    out = tokenize_conversation(tokenizer, messages, tools=TOOLS)
    trained_text = tokenizer.decode([t for t, l in zip(out["input_ids"], out["labels"]) if l >= 0])
    assert trained_text == (
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city":"Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>Sunny.<|im_end|>'
    )


def test_straddling_tokens_are_never_trained():
    """With a header that ends in a space, BPE merges the space with the content's first word ("Ġx"): that token
    straddles the boundary and is trained as neither side."""
    from data_helpers import TOKENIZER_DIR

    template = "{% for m in messages %}{{ '<|im_assistant|>' + m.role + ' ' + m.content + '<|im_end|>' }}{% endfor %}"
    tokenizer = load_tokenizer(str(TOKENIZER_DIR), chat_template=template)
    out = tokenize_conversation(tokenizer, [{"role": "assistant", "content": "x x"}])
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert tokens == ["<|im_assistant|>", "assistant", "Ġx", "Ġx", "<|im_end|>"]
    assert [tokens[i] for i, label in enumerate(out["labels"]) if label >= 0] == ["Ġx", "<|im_end|>"]
    assert out["labels"][2] == IGNORE_INDEX


PLAIN_TEMPLATE = "{% for m in messages %}{{ m.role + ' ' + m.content + ' done.' }}{% endfor %}"


@settings(max_examples=100, deadline=None)
@given(
    contents=st.lists(
        st.lists(st.sampled_from([" ", "  ", "x", "yz", " a", "done", ".", "\n", "東"]), max_size=5).map("".join),
        min_size=1, max_size=3,
    )
)
def test_template_without_special_tokens(contents):
    """A template with no special token at all (header "assistant ", footer " done."), so merges may cross every
    boundary: exactly the tokens wholly inside an assistant content are trained, and the tokens wholly inside its
    footer (which holds no eos token) are its end of turn."""
    from data_helpers import TOKENIZER_DIR

    tokenizer = load_tokenizer(str(TOKENIZER_DIR), chat_template=PLAIN_TEMPLATE)
    messages = [{"role": "assistant", "content": c} for c in contents]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    trained_ranges, position = [], 0
    for c in contents:
        position += len("assistant ")
        trained_ranges += [(position, position + len(c)), (position + len(c), position + len(c) + len(" done."))]
        position += len(c) + len(" done.")
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    expected = [
        token if any(a <= s and e <= b and s < e for a, b in trained_ranges) else IGNORE_INDEX
        for token, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    out = tokenize_conversation(tokenizer, messages)
    assert out["input_ids"] == encoded["input_ids"]
    assert out["labels"] == expected


PARTS_TEMPLATE = (
    "{% for m in messages %}{{ m.role + ' ' }}{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}{{ ' done.' }}{% endfor %}"
)


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.lists(
            st.tuples(
                st.lists(st.sampled_from([" ", "x", "yz", " a", "Hel", "lo", "done", ".", "\n", "東", "😀"]),
                         max_size=4).map("".join),
                st.sampled_from([{}, {"train": True}, {"train": False}, {"weight": 0}, {"weight": 1}]),
            ),
            max_size=4,
        ).map(lambda parts: {"role": "assistant", "content": [P(text, **flags) for text, flags in parts]}),
        min_size=1, max_size=3,
    )
)
def test_part_boundaries_inside_plain_text(messages):
    """Parts in a template without special tokens, so BPE merges cross part boundaries everywhere: exactly the
    tokens wholly inside trained text are trained (the fast tokenizer's offsets are the reference)."""
    from data_helpers import TOKENIZER_DIR, flag

    tokenizer = load_tokenizer(str(TOKENIZER_DIR), chat_template=PARTS_TEMPLATE)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    group = []  # per character: ("body", i) for trained text of message i, ("footer", i) for its end of turn
    for i, message in enumerate(messages):
        group += [None] * len("assistant ")
        for part in message["content"]:
            group += [("body", i) if flag(part) is not False else None] * len(part["text"])
        group += [("footer", i)] * len(" done.")  # the footer holds no eos token: all of it is the end of turn
    assert len(group) == len(text)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    expected = [
        token if s < e and group[s] is not None and len(set(group[s:e])) == 1 else IGNORE_INDEX
        for token, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    out = tokenize_conversation(tokenizer, messages)
    assert out["input_ids"] == encoded["input_ids"]
    assert out["labels"] == expected


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "empty conversation"),
        ("hello", "messages is not a list"),
        (["hello"], "message is not a mapping"),
        ([{"content": "x"}], "missing role"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": 5}], "content of the wrong type"),
        ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "content of the wrong type"),
        ([{"role": "user"}], "missing content"),
        ([{"role": "assistant", "content": "x", "tool_calls": "f()"}], "bad tool_calls"),
        ([{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}], "bad tool_calls"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "tool_calls outside an assistant message"),
        ([{"role": "assistant", "content": "x", "train": "yes"}], "train flag is not true/false/0/1"),
        ([{"role": "assistant", "content": "x", "weight": 0.5}], "train flag is not true/false/0/1"),
        ([{"role": "assistant", "content": "x", "train": 2}], "train flag is not true/false/0/1"),
        ([{"role": "assistant", "content": [{"type": "text", "text": "x", "weight": "0"}]}],
         "train flag is not true/false/0/1"),
        ([{"role": "assistant", "content": "x", "train": True, "weight": 0}], "train and weight disagree"),
        ([{"role": "assistant", "content": [{"type": "text", "text": "x", "train": False, "weight": 1}]}],
         "train and weight disagree"),
        ([{"role": "assistant", "content": "x", "name": 3}], "name is not a string"),
        ([{"role": "user", "content": "only a question"}], "no trainable token"),
    ],
)
def test_bad_conversations_name_their_reason(tokenizer, messages, reason):
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(tokenizer, messages)
    assert err.value.reason == reason


def test_bad_tools_and_template_errors_name_their_reason(tokenizer):
    messages = [{"role": "assistant", "content": "a"}]
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(tokenizer, messages, tools=["get_weather"])
    assert err.value.reason == "tools is not a list of objects"
    from data_helpers import TOKENIZER_DIR

    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
    with pytest.raises(ConversationError, match="must start with user") as err:
        tokenize_conversation(load_tokenizer(str(TOKENIZER_DIR), chat_template=strict), messages)
    assert err.value.reason == "chat template error"


def test_template_that_is_not_prefix_stable_is_refused():
    from data_helpers import TOKENIZER_DIR

    last_only = "{{ '<|im_assistant|>assistant<|im_middle|>' + messages[-1].content + '<|im_end|>' }}"
    tokenizer = load_tokenizer(str(TOKENIZER_DIR), chat_template=last_only)
    messages = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ConversationError, match="not prefix-stable"):
        tokenize_conversation(tokenizer, messages)


def test_unknown_train_on_eos_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="train_on_eos"):
        tokenize_conversation(tokenizer, [{"role": "assistant", "content": "a"}], train_on_eos="all")
