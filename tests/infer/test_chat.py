"""The chat: streamed text never splits a character, each turn reuses the cache exactly when the template's
rendering extends it and equals a fresh generation either way, /reset and /exit, and the CLI end to end."""

from __future__ import annotations

import yaml
from infer_helpers import TINY_CONFIG
from typer.testing import CliRunner

from kimitune.cli import app
from kimitune.infer import ChatSession, SamplingSettings, TextStream, generate, prompt_ids, run_chat, stop_token_ids
from kimitune.infer.chat import CONTINUATION, HELP_TEXT, read_message

SETTINGS = SamplingSettings(max_new_tokens=3)


def test_stream_never_splits_a_multibyte_character(tokenizer):
    text = "héllo 日本 🙂 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece == "") >= 3  # the emoji and the CJK characters span several tokens


def fresh_reply(model, tokenizer, messages, seed_index: int) -> str:
    """The reply a new cache gives to the whole rendering (what a reused cache must reproduce)."""
    (result,) = generate(model, [prompt_ids(tokenizer, messages)], SETTINGS, stop_token_ids(model.config, tokenizer),
                         seeds_from=seed_index)
    return tokenizer.decode(result.tokens, skip_special_tokens=True)


def test_turns_reuse_the_cache_only_when_the_rendering_extends_it(tiny_model, tokenizer):
    session = ChatSession(tiny_model, tokenizer, SETTINGS, system="Be brief.")
    reused = []
    for turn, text in enumerate(["hello", "what is 2+2?", "and 3+3?", "thanks", "bye"]):
        history = [*session.messages, {"role": "user", "content": text}]
        expected = fresh_reply(tiny_model, tokenizer, history, turn)
        before = list(session.cache.sequences[0]) if turn else []
        assert session.reply(text) == expected
        rendering = prompt_ids(tokenizer, history)
        assert session.reused_tokens == (len(before) if before and rendering[: len(before)] == before else 0)
        assert session.cache.sequences[0][: len(rendering)] == rendering
        reused.append(session.reused_tokens)
    assert any(reused), "no turn reused the cache"
    # An edited history no longer extends the cache: it is rebuilt from the rendering.
    session.messages[-1]["content"] = "something else entirely"
    history = [*session.messages, {"role": "user", "content": "again"}]
    assert session.reply("again") == fresh_reply(tiny_model, tokenizer, history, 5)
    assert session.reused_tokens == 0


def reader(lines: list[str]):
    """``read_line`` over ``lines``: what typing them would give (None once they are used up), and the prompts."""
    remaining, prompts = iter(lines), []

    def read_line(prompt: str) -> str | None:
        prompts.append(prompt)
        return next(remaining, None)

    return read_line, remaining, prompts


class RecordingSession:
    """What run_chat asks of a session, recording the messages it is sent."""

    def __init__(self) -> None:
        self.sent, self.resets = [], 0

    def reset(self) -> None:
        self.resets += 1

    def reply(self, text, write):
        self.sent.append(text)
        write("ok")


def test_chat_loop_resets_and_exits(tiny_model, tokenizer):
    session = ChatSession(tiny_model, tokenizer, SETTINGS)
    written = []
    read_line, lines, _ = reader(["hi", "", "/reset", "hi", "/exit", "never read"])
    run_chat(session, read_line, written.append)
    assert next(lines) == "never read"
    output = "".join(written)
    assert output.count("assistant: ") == 2 and "(conversation reset)" in output
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # only the turn after the reset


def test_chat_command_streams_replies(tiny_folder, tiny_model, tokenizer):
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_folder), "--max-new-tokens", "3", "--device", "cpu"],
                                input="hello\n/exit\n")
    assert result.exit_code == 0, result.output
    expected = fresh_reply(tiny_model, tokenizer, [{"role": "user", "content": "hello"}], 0)
    assert f"assistant: {expected}\n" in result.output


def test_chat_command_takes_the_trained_model_from_a_config(tiny_folder, tiny_model, tokenizer, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"init_from_config": str(TINY_CONFIG), "tokenizer": "unused",
                                      "output_dir": str(tiny_folder), "datasets": [{"path": "unused.jsonl"}]}))
    result = CliRunner().invoke(app, ["chat", "--config", str(config), "--system", "Be brief.", "--max-new-tokens",
                                      "3", "--device", "cpu"], input="hi\n")
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert f"assistant: {fresh_reply(tiny_model, tokenizer, messages, 0)}\n" in result.output


def test_chat_command_refuses_bad_options(tiny_folder, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["chat", "--model", str(tiny_folder), "--top-p", "2"], input="/exit\n")
    assert result.exit_code == 2 and "top_p must be in (0, 1]" in " ".join(result.output.split())
    result = runner.invoke(app, ["chat", "--model", str(tmp_path / "missing")], input="/exit\n")
    assert result.exit_code == 2 and "no model folder at" in " ".join(result.output.split())


def test_chat_takes_messages_of_several_lines():
    session, written = RecordingSession(), []
    read_line, _, prompts = reader([
        "first line \\", "second line\\", "third",   # trailing backslashes continue the message
        '"""', "a block", "", "  indented", '"""',        # a block keeps its lines as typed
        "one line",
    ])
    run_chat(session, read_line, written.append)
    assert session.sent == ["first line \nsecond line\nthird", "a block\n\n  indented", "one line"]
    assert prompts.count("\nyou: ") == 4 and prompts.count(CONTINUATION) == 6  # the last: end of input


def test_unknown_commands_are_refused_with_the_known_ones_and_help_explains():
    session, written = RecordingSession(), []
    read_line, _, _ = reader(["/rest", "/help", "//etc/hosts is a file", "/reset", "/exit"])
    run_chat(session, read_line, written.append)
    output = "".join(written)
    assert "unknown command /rest: the commands are /help, /reset, /exit" in output
    assert HELP_TEXT in output and '"""' in HELP_TEXT and "\\" in HELP_TEXT
    assert session.sent == ["/etc/hosts is a file"] and session.resets == 1


def test_an_unclosed_block_at_the_end_of_input_is_not_sent():
    read_line, _, _ = reader(['"""', "half a message"])
    assert read_message(read_line) is None
