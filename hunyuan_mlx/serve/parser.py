"""Hunyuan-A13B's output parsed as it streams: reasoning, answer and tool calls (pure Python).

The model writes `<think>reasoning</think>\\n<answer>\\nreply\\n</answer>`; with tools it may
write `<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>` instead of a reply. The
parser takes the generated text in whatever pieces it comes and gives the same result for every
split: a tag split across pieces is held back until it is resolved, and so is whitespace that may
turn out to end a section. It tolerates the slips seen in the wild: `<answer>` tags anywhere,
thinking closed by `</answer>`, `answer>` with its `<` dropped, a leading "助手：" (the template's
plain-reply prefix) in tool mode, text after the tool block. A tool block whose JSON does not
parse comes back as content, tags included.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..generation.display import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
ANSWER_OPEN_CLIPPED = "answer>"  # `<answer>` with its first character lost
TOOLS_OPEN, TOOLS_CLOSE = "<tool_calls>", "</tool_calls>"
ASSISTANT_PREFIXES = ("助手：", "助手:")


@dataclass(frozen=True)
class ToolCall:
    """One function call: `arguments` is a JSON string, as OpenAI's API carries it."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass
class Delta:
    """What a piece of output added: reasoning text, reply text and whole tool calls."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def extend(self, other: Delta) -> None:
        """Append `other` to this delta (how a whole reply is gathered)."""
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def find_first(text: str, tags: tuple[str, ...]) -> tuple[int, str]:
    """(position, tag) of the earliest of `tags` in `text`; (-1, "") when none occurs."""
    best = (-1, "")
    for tag in tags:
        i = text.find(tag)
        if i >= 0 and (best[0] < 0 or i < best[0]):
            best = (i, tag)
    return best


class _Trimmed:
    """A section's text without its leading and trailing whitespace, decided as it streams:
    whitespace is passed on only once more text follows it."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def add(self, text: str) -> str:
        text = self.held + text
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.held = text[len(body) :]
        self.started = self.started or bool(body)
        return body


def parse_tool_calls(block: str, first_index: int) -> list[ToolCall] | None:
    """The calls of a tool block's JSON (a list of {"name", "arguments"}, or one such object);
    None when it is not that."""
    try:
        calls = json.loads(block)
    except json.JSONDecodeError:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments: Any = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        out.append(ToolCall(first_index + i, call_id, call["name"], arguments))
    return out


class OutputParser:
    """Splits streamed Hunyuan output into reasoning, content and tool calls.

    `tools` turns on tool-mode parsing (`<tool_calls>` blocks and the "助手：" prefix); without it
    those stay plain content.
    """

    def __init__(self, tools: bool = False) -> None:
        self.tools = tools
        self._state = "start"
        self._thought = False  # a think section was seen: another <think> is content
        self._answer_opened = False
        self._buf = ""
        self._reasoning_text = _Trimmed()
        self._content_text = _Trimmed()
        self._calls = 0

    def feed(self, text: str) -> Delta:
        """The reasoning, content and tool calls `text` completes; partial tags wait."""
        self._buf += text
        return self._run(final=False)

    def finish(self) -> Delta:
        """Whatever was held back, once the output has ended."""
        return self._run(final=True)

    def _run(self, final: bool) -> Delta:
        delta = Delta()
        steps = {
            "start": self._start,
            "think": self._think,
            "content": self._content,
            "tool_block": self._tool_block,
        }
        while steps[self._state](delta, final):
            pass
        return delta

    def _emit_content(self, delta: Delta, text: str) -> None:
        delta.content += self._content_text.add(text)

    def _start(self, delta: Delta, final: bool) -> bool:
        """Beginning of the output, or after the thinking: tags that may open what follows."""
        self._buf = self._buf.lstrip()
        if not self._buf:
            return False
        openers: list[str] = []
        if not self._thought and not self._answer_opened:
            openers.append(THINK_OPEN)
        if not self._answer_opened:
            openers += [ANSWER_OPEN, ANSWER_OPEN_CLIPPED]
        if self.tools:
            openers += [TOOLS_OPEN, *ASSISTANT_PREFIXES]
        for tag in openers:
            if self._buf.startswith(tag):
                self._buf = self._buf[len(tag) :]
                if tag == THINK_OPEN:
                    self._state = "think"
                elif tag == TOOLS_OPEN:
                    self._state = "tool_block"
                elif tag in ASSISTANT_PREFIXES:
                    self._state = "content"
                else:
                    self._answer_opened = True
                return True
        if not final and any(tag.startswith(self._buf) for tag in openers):
            return False
        self._state = "content"
        return True

    def _think(self, delta: Delta, final: bool) -> bool:
        # </answer> closing the thinking and <answer> opening without a </think> are both slips.
        tags = (THINK_CLOSE, ANSWER_CLOSE, ANSWER_OPEN)
        i, tag = find_first(self._buf, tags)
        if i < 0:
            keep = 0 if final else partial_suffix(self._buf, tags)
            delta.reasoning += self._reasoning_text.add(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        delta.reasoning += self._reasoning_text.add(self._buf[:i])
        self._buf = self._buf[i + len(tag) :]
        self._thought = True
        self._answer_opened = tag == ANSWER_OPEN
        self._state = "start"
        return True

    def _content(self, delta: Delta, final: bool) -> bool:
        tags = (ANSWER_OPEN, ANSWER_CLOSE, *((TOOLS_OPEN,) if self.tools else ()))
        i, tag = find_first(self._buf, tags)
        if i < 0:
            keep = 0 if final else partial_suffix(self._buf, tags)
            self._emit_content(delta, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        self._emit_content(delta, self._buf[:i])
        self._buf = self._buf[i + len(tag) :]
        if tag == TOOLS_OPEN:
            self._state = "tool_block"
        return True

    def _tool_block(self, delta: Delta, final: bool) -> bool:
        i = self._buf.find(TOOLS_CLOSE)
        if i < 0 and not final:
            return False
        block = self._buf if i < 0 else self._buf[:i]
        calls = parse_tool_calls(block, self._calls)
        if calls is None:
            self._emit_content(delta, TOOLS_OPEN + block + ("" if i < 0 else TOOLS_CLOSE))
        else:
            delta.tool_calls.extend(calls)
            self._calls += len(calls)
        self._buf = "" if i < 0 else self._buf[i + len(TOOLS_CLOSE) :]
        self._state = "content"
        return True


class StopStrings:
    """Cuts streamed text at the first of the request's stop strings; a possible partial match
    at the end is held back until it is decided."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = tuple(stops)
        self.matched: str | None = None  # the stop string reached, once one is
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to pass on, whether a stop string was reached)."""
        self._buf += text
        if not self.stops:
            out, self._buf = self._buf, ""
            return out, False
        i, stop = find_first(self._buf, self.stops)
        if i >= 0:
            self.matched = stop
            out, self._buf = self._buf[:i], ""
            return out, True
        keep = partial_suffix(self._buf, self.stops)
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return out, False

    def flush(self) -> str:
        """What was held back, once the output has ended without a stop string."""
        out, self._buf = self._buf, ""
        return out
