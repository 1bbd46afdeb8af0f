"""Interactive multi-turn chat in the terminal: the chat template, streamed tokens, one cache across turns.

Each turn renders the whole conversation with the tokenizer's chat template (plus the assistant's generation
prompt) and tokenises it as training data is tokenised. When those ids extend exactly what the cache has already
seen (the previous prompt and the reply tokens fed during decoding), only the new tokens are fed: the KDA states
and MLA latents carry the history. When they do not (the reply's text tokenises differently from the tokens the
model chose, or it stopped at ``max_new_tokens`` without ``<|im_end|>``), the cache is rebuilt from the rendering, so
the cache always holds exactly what the template renders.

Streaming: ``TextStream`` turns token ids into text as they come and never prints half of a multi-byte character
(byte-level BPE splits them across tokens).

Input (``run_chat``): one line is one message; a line ending in ``\\`` continues on the next line, and a line that is
just ``\"\"\"`` starts a block of lines that the next such line ends, sent as one message. Commands: ``/help`` shows
this, ``/reset`` forgets the conversation (the system prompt stays), ``/exit`` (or end of input) quits; any other
line starting with ``/`` is refused with the list of commands (start a message with ``//`` to send it with one
``/``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kimitune.infer.cache import GenerationCache
from kimitune.infer.generate import decode, prompt_ids, stop_token_ids
from kimitune.infer.sampling import SamplingSettings
from kimitune.model import KimiLinearForCausalLM

RESET, EXIT, HELP = "/reset", "/exit", "/help"
COMMANDS = (HELP, RESET, EXIT)
BLOCK = '"""'
PROMPT, CONTINUATION = "\nyou: ", "...  "
HELP_TEXT = f"""Commands:
  {HELP}    this help
  {RESET}   start the conversation over (the system prompt stays)
  {EXIT}    quit (end of input quits too)
Several lines in one message:
  end a line with \\ to go on on the next line, or
  type {BLOCK} on a line of its own, then the lines, then {BLOCK} again.
A message that starts with / : type // (the first / is dropped).
"""
_INCOMPLETE = "\ufffd"  # what decoding shows for the first bytes of a character whose last bytes are missing


class TextStream:
    """Token ids in, printable text out: ``push(id)`` returns the text that became complete with it.

    Decodes a short window (vLLM's prefix/read offsets): the text of ``ids[prefix:]`` minus that of
    ``ids[prefix:read]``; text that ends in an incomplete character waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._text(self.ids[self.prefix : self.read])
        now = self._text(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith(_INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


class ChatSession:
    """A conversation with a model: ``reply(text, on_text)`` adds the user's message, streams and returns the
    assistant's reply, and keeps the cache for the next turn."""

    def __init__(
        self,
        model: KimiLinearForCausalLM,
        tokenizer: Any,
        settings: SamplingSettings,
        system: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.system = system
        self.stop_ids = stop_token_ids(model.config, tokenizer)
        self.cache = GenerationCache(model)
        self.messages: list[dict[str, str]] = []
        self.turns = 0  # replies so far: each draws with its own seed stream
        self.reused_tokens = 0  # tokens the last turn found in the cache (not fed again)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.reset()

    def reply(self, text: str, on_text: Callable[[str], None] = lambda _: None) -> str:
        """Adds the user's ``text``, generates the reply (``on_text`` gets it piece by piece) and records it."""
        self.messages.append({"role": "user", "content": text})
        ids = prompt_ids(self.tokenizer, self.messages)
        cached = self.cache.sequences[0] if len(self.cache) == 1 else []
        if cached and len(ids) > len(cached) and ids[: len(cached)] == cached:
            self.reused_tokens = len(cached)
            logits = self.cache.extend(ids[len(cached) :])
        else:
            self.reused_tokens = 0
            self.cache.reset()
            logits = self.cache.prefill([ids])
        stream = TextStream(self.tokenizer)
        (result,) = decode(self.cache, logits, self.settings, self.stop_ids, seeds_from=self.turns,
                           on_token=lambda _, token: on_text(stream.push(token)))
        self.turns += 1
        reply = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def read_message(read_line: Callable[[str], str | None]) -> str | None:
    """One message from the user: a line, lines joined by a trailing ``\\``, or a ``\"\"\"`` block (module docstring).
    ``read_line(prompt)`` returns a line without its newline, or None at the end of input; so does this."""
    line = read_line(PROMPT)
    if line is None:
        return None
    if line.strip() == BLOCK:
        lines = []
        while (line := read_line(CONTINUATION)) is not None and line.strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines) if line is not None else None  # an unclosed block at the end of input is dropped
    lines = []
    while line is not None and line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(CONTINUATION)
    return "\n".join(lines + ([line] if line is not None else []))


def run_chat(session: ChatSession, read_line: Callable[[str], str | None], write: Callable[[str], None]) -> None:
    """The terminal loop: reads messages with ``read_message(read_line)`` until ``/exit`` or the end of input, runs
    the commands, and writes the streamed replies with ``write``."""
    write(f"Chat ({HELP} for commands and multi-line input, {EXIT} quits)\n")
    while (message := read_message(read_line)) is not None:
        text = message.strip()
        if text == EXIT:
            return
        if text == RESET:
            session.reset()
            write("(conversation reset)\n")
            continue
        if text == HELP:
            write(HELP_TEXT)
            continue
        if text.startswith("//"):
            text = text[1:]
        elif text.startswith("/"):
            write(f"unknown command {text.split()[0]}: the commands are {', '.join(COMMANDS)} "
                  "(start a message with // to send it with one /)\n")
            continue
        if not text:
            continue
        write("assistant: ")
        session.reply(text, write)
        write("\n")
