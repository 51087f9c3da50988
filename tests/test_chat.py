"""ChatSession keeps the KV cache between turns and prefills only what the cache lacks."""

from __future__ import annotations

import io

import mlx.core as mx
import pytest

# The fixtures register under their names, `loaded` and `tiny_release`.
from hunyuan_mlx.cli.chat import repl
from hunyuan_mlx.generation.session import ChatSession
from hunyuan_mlx.generation.settings import GenerationSettings

GREEDY = GenerationSettings(max_tokens=8)


class ScriptedReply:
    """A logits processor making the model say `tokens`, one per generation step."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.step = 0

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        if self.step >= len(self.tokens):
            return logits
        target = self.tokens[self.step]
        self.step += 1
        return logits + 1e4 * (mx.arange(logits.shape[-1]) == target)


def reply_of(session: ChatSession, text: str) -> str:
    return "".join(r.text for r in session.send(text))


def fresh_reply(session: ChatSession, history: list[dict[str, str]], text: str) -> tuple[str, int]:
    """The reply and prefill count of a new session like `session` that runs all of `history`."""
    fresh = ChatSession(session.model, session.tokenizer, session.settings)
    fresh.enable_thinking = session.enable_thinking
    fresh.messages = [dict(m) for m in history]
    return reply_of(fresh, text), fresh.prefilled


def test_second_turn_prefills_only_the_new_tokens(loaded):
    model, tok = loaded
    answer = tok.encode("<answer>\nHello there.\n</answer><|eos|>")
    session = ChatSession(model, tok, GenerationSettings(max_tokens=32), enable_thinking=False)
    session.logits_processors = [ScriptedReply(answer)]
    first = reply_of(session, "Hi!")
    assert first == "<answer>\nHello there.\n</answer>"
    first_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], enable_thinking=False
    )
    assert session.prefilled == len(first_prompt)
    assert session.messages[-1]["content"] == "<think>\n\n</think>\n" + first

    session.logits_processors = ()
    history = [dict(m) for m in session.messages]
    second = reply_of(session, "And then?")
    # The new user turn as the template writes it, plus the empty think block: nothing else.
    new_turn = tok.encode("<|startoftext|>And then?<|extra_0|><think>\n\n</think>\n")
    assert session.prefilled == len(new_turn)
    assert session.reused == len(first_prompt) + len(answer)
    # Continuing from the cache gives what running the whole conversation gives.
    expected, full = fresh_reply(session, history, "And then?")
    assert second == expected and full == len(first_prompt) + len(answer) + len(new_turn)


def test_mismatched_history_falls_back_to_the_common_prefix(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, GREEDY)
    reply_of(session, "Hi!")
    # Random weights stop at max_tokens without <|eos|>, which the template adds: the cache
    # lacks it. Editing the reply moves the first difference earlier still.
    session.messages[-1]["content"] = "edited"
    history = [dict(m) for m in session.messages]
    second = reply_of(session, "And then?")
    expected, full = fresh_reply(session, history, "And then?")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi!"}])
    assert session.prefilled == full - len(prompt)
    assert second == expected


def test_repl_commands(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, GenerationSettings(max_tokens=3))
    too_long = "word " * 300
    lines = iter(["Hello", too_long, "/no_think", "/reset", "Again", "/exit", "Never sent"])
    out = io.StringIO()
    repl(session, read=lambda _: next(lines), out=out)
    shown = out.getvalue()
    assert "[thinking off]" in shown and "[conversation reset]" in shown
    assert "error: The prompt has" in shown
    assert session.enable_thinking is False
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "Again"
    assert next(lines) == "Never sent"


def test_empty_or_too_long_messages_are_refused(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, GREEDY)
    with pytest.raises(ValueError, match="more than 256"):
        session.send("word " * 300)
    with pytest.raises(ValueError, match="The prompt is empty"):
        session.send(" ")
    assert session.messages == []


def test_rotating_window_checks_each_turn_not_the_conversation(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, GenerationSettings(max_tokens=8, max_kv_size=16))
    for text in ("Hi", "And?", "More!"):
        assert len(list(session.send(text))) == 8
    assert len(tok.apply_chat_template(session.messages)) > 16
    with pytest.raises(ValueError, match=r"more than 16 \(max_kv_size\)"):
        session.send("word " * 20)


def scripted(lines: list[str]):
    """A `read` for `repl` that types `lines`, then ends the input as Ctrl-D does."""
    remaining = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read


def test_repl_blocks_quit_words_and_unknown_commands(loaded):
    model, tok = loaded
    for quit_word in ("/quit", "/exit", "q"):
        session = ChatSession(model, tok, GenerationSettings(max_tokens=2))
        repl(session, read=scripted([quit_word, "Never sent"]), out=io.StringIO())
        assert session.messages == []
    session = ChatSession(model, tok, GenerationSettings(max_tokens=2))
    out = io.StringIO()
    block = ['"""', "  line one", "/reset", "", '"""']
    repl(session, read=scripted(["/bogus x", *block, "quit it"]), out=out)
    shown = out.getvalue()
    assert "[unknown command /bogus;" in shown and shown.count("/no_think") == 2  # help again
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["  line one\n/reset\n", "quit it"]
    assert shown.endswith("\n\n")  # Ctrl-D: the shell prompt starts on a new line


def test_real_terminal_line_editing_and_history():
    """In a pseudo-terminal, readline edits the line (left arrow) and recalls history (up arrow),
    Ctrl-C drops the line being typed for a new prompt, and Ctrl-D ends the chat on a new line.
    A fake session echoes each message."""
    import fcntl
    import os
    import select
    import subprocess
    import sys
    import termios
    import time

    pty = pytest.importorskip("pty")
    pytest.importorskip("readline")
    script = (
        "import types\n"
        "from hunyuan_mlx.cli.chat import enable_line_editing, repl\n"
        "class Echo:\n"
        "    def send(self, text):\n"
        "        return iter([types.SimpleNamespace(text=f'[{text}]')])\n"
        "enable_line_editing()\n"
        "repl(Echo())\n"
        "print('BYE')\n"
    )
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=terminal, stdout=terminal, stderr=terminal,
        env={**os.environ, "TERM": "xterm"}, close_fds=True,
        # The terminal made the chat's controlling one, so that Ctrl-C sends it SIGINT.
        start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    os.close(terminal)
    output = b""

    def type_and_wait(keys: bytes, marker: bytes, count: int = 1) -> None:
        nonlocal output
        os.write(controller, keys)
        deadline = time.monotonic() + 120  # a loaded machine starts Python slowly
        while output.count(marker) < count and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                output += os.read(controller, 4096)

    try:
        # Each key press waits for the prompt: readline sets the terminal up when it starts.
        type_and_wait(b"", b"\n>> ")
        type_and_wait(b"abc\x1b[DX\r", b"\n>> ", count=2)
        type_and_wait(b"\x1b[A\r", b"\n>> ", count=3)
        type_and_wait(b"half a li\x03", b"\n>> ", count=4)  # Ctrl-C: a new prompt (item 10)
        type_and_wait(b"\x04", b"BYE")
    finally:
        process.kill()
        os.close(controller)
    text = output.decode(errors="replace")
    assert text.count("\n[abXc]") == 2 and ">> \r\nBYE" in text, text
    assert "[to quit: /quit or Ctrl-D]\r\n>> " in text and "half a li]" not in text, text
