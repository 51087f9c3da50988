"""Anthropic's Messages API (`POST /v1/messages`) as this server speaks it: the request as the
internal chat request, and the parsed output as Anthropic's message and streaming events.

Requests: `system`, multi-turn `messages` (text, `tool_use` and `tool_result` blocks; `thinking`
blocks of earlier turns are dropped, as the chat template drops earlier reasoning), `max_tokens`,
`stop_sequences`, `temperature` / `top_p` / `top_k`, `tools` and `tool_choice` (`auto`, `any`,
`tool`, `none`), `thinking` (`enabled` with `budget_tokens`, or `disabled`). Replies: `thinking`,
`text` and `tool_use` blocks, `stop_reason`, usage; errors in Anthropic's error shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .parser import Delta, ToolCall
from .protocol import (
    SAMPLING_FIELDS,
    APIError,
    Request,
    _bool,
    _number,
    _text_content,
    invalid,
    new_id,
    tool_list,
)

# Anthropic's sampling ranges: temperature is in [0, 1] there.
SAMPLING_RANGES = {"temperature": (0.0, 1.0), "top_p": (0.0, 1.0), "top_k": (0, math.inf)}
TOOL_CHOICES = ("auto", "any", "tool", "none")
# finish reason -> stop_reason ("stop" after a stop sequence is "stop_sequence")
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# HTTP status -> Anthropic's error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
SERVER_ERROR_TYPE = "api_error"


def error_body(error: APIError) -> dict[str, Any]:
    """Anthropic's error object; the field at fault, which it has no key for, leads the message."""
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    kind = ERROR_TYPES.get(error.status, SERVER_ERROR_TYPE)
    return {"type": "error", "error": {"type": kind, "message": message}}


def _text(value: Any, param: str) -> str:
    """A `system` prompt or `tool_result` content: a string or a list of text blocks, joined
    (OpenAI's text parts have the same shape)."""
    return _text_content(value, param) or ""


def _blocks(value: Any, param: str) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list) or not all(isinstance(b, dict) for b in value):
        raise invalid(param, "content must be a string or a list of content blocks")
    return value


def _user_turn(blocks: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """A user message as chat messages: a tool message per `tool_result`, then its text."""
    out, texts = [], []
    for i, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            texts.append(_text([block], f"{param}[{i}]"))
        elif kind == "tool_result":
            content = _text(block.get("content", ""), f"{param}[{i}].content")
            out.append({"role": "tool", "content": content})
        else:
            raise invalid(f"{param}[{i}].type", f"User blocks can be text or tool_result, not "
                          f"{kind!r}")  # fmt: skip
    if texts:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_turn(blocks: list[dict[str, Any]], param: str) -> dict[str, Any]:
    """An assistant message as a chat message with its text and tool calls."""
    texts, calls = [], []
    for i, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            texts.append(_text([block], f"{param}[{i}]"))
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise invalid(f"{param}[{i}]", "A tool_use block needs a name and an input object")
            function = {"name": block["name"], "arguments": json.dumps(block["input"])}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        elif kind not in ("thinking", "redacted_thinking"):
            raise invalid(f"{param}[{i}].type", f"Assistant blocks can be text, tool_use or "
                          f"thinking, not {kind!r}")  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise invalid("messages", "messages must be a non-empty list")
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise invalid(f"{param}.role", "role must be user or assistant")
        blocks = _blocks(message.get("content"), f"{param}.content")
        if role == "user":
            out += _user_turn(blocks, f"{param}.content")
        else:
            out.append(_assistant_turn(blocks, f"{param}.content"))
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """Anthropic's tools as OpenAI's function tools (the chat template's shape)."""
    out = []
    for i, tool in enumerate(tool_list(value)):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            raise invalid(f"tools[{i}]", "Only custom tools (name, input_schema) are supported")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise invalid(f"tools[{i}].name", "A tool needs a name")
        if not isinstance(tool.get("input_schema"), dict):
            raise invalid(f"tools[{i}].input_schema", "A tool needs an input_schema object")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        if tool.get("strict"):
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out or None


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str:
    """Anthropic's `tool_choice` as the internal one: "auto", "none", "required" or a name."""
    if value is None:
        return "auto"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in TOOL_CHOICES:
        raise invalid(
            "tool_choice.type", f"tool_choice.type must be one of {', '.join(TOOL_CHOICES)}"
        )
    if kind in ("any", "tool") and not tools:
        raise invalid("tool_choice", f"tool_choice {kind!r} needs tools")
    if kind == "tool":
        name = value.get("name")
        if name not in [t["function"]["name"] for t in tools or []]:
            raise invalid("tool_choice.name", f"No tool named {name!r} in tools")
        return name
    return {"any": "required"}.get(kind, kind)


def _thinking(value: Any, request: Request) -> None:
    """`thinking`: enabled (with its budget) or disabled, through the chat template's switch."""
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "disabled":
        request.template_kwargs["enable_thinking"] = False
    elif kind == "enabled":
        request.template_kwargs["enable_thinking"] = True
        if value.get("budget_tokens") is not None:
            request.thinking_budget = _number(value, "budget_tokens", 0, math.inf, True, False)
    else:
        raise invalid("thinking.type", "thinking.type must be enabled or disabled")


def parse_messages(body: dict[str, Any]) -> Request:
    """A /v1/messages body, validated, as the internal chat request."""
    request = Request(chat=True)
    request.stream = _bool(body, "stream")
    if body.get("max_tokens") is None:
        raise invalid("max_tokens", "max_tokens is required")
    request.sampling["max_tokens"] = _number(body, "max_tokens", 1, math.inf, True, False)
    for name, (low, high) in SAMPLING_RANGES.items():
        if body.get(name) is not None:
            setting, _, _, integer, open_low = SAMPLING_FIELDS[name]
            request.sampling[setting] = _number(body, name, low, high, integer, open_low)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise invalid("stop_sequences", "stop_sequences must be a list of non-empty strings")
        request.stop = stops
    _conversation(body, request)
    return request


def parse_count_tokens(body: dict[str, Any]) -> Request:
    """A /v1/messages/count_tokens body (a Messages request's conversation: no max_tokens),
    validated, as the internal chat request whose prompt is counted."""
    request = Request(chat=True)
    _conversation(body, request)
    return request


def _conversation(body: dict[str, Any], request: Request) -> None:
    """What makes the prompt: system and messages, tools and tool_choice, thinking."""
    request.messages = _messages(body)
    tools = _tools(body.get("tools"))
    request.tool_choice = _tool_choice(body.get("tool_choice"), tools)
    request.tools = tools if request.tool_choice != "none" else None
    if request.tools is not None:
        request.structured = "tools"
    _thinking(body.get("thinking"), request)


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str | None:
    """Anthropic's `stop_reason` of a finish reason; `stop_sequence` when one ended the reply."""
    if stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish_reason or "", finish_reason)


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage: the input split into what the prompt cache held and the rest."""
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "cache_read_input_tokens": cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def tool_use(call: ToolCall) -> dict[str, Any]:
    """A tool call as a `tool_use` block."""
    return {
        "type": "tool_use",
        "id": call.id,
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def content_blocks(delta: Delta) -> list[dict[str, Any]]:
    """The content of a whole reply: thinking, text, then the tool calls."""
    blocks: list[dict[str, Any]] = []
    if delta.reasoning:
        blocks.append({"type": "thinking", "thinking": delta.reasoning, "signature": ""})
    if delta.content:
        blocks.append({"type": "text", "text": delta.content})
    return blocks + [tool_use(c) for c in delta.tool_calls]


def message(
    model: str,
    content: list[dict[str, Any]],
    stop: str | None,
    stop_sequence: str | None,
    usage: dict[str, int],
) -> dict[str, Any]:
    """Anthropic's message object (`content` empty and `stop` None at a stream's start)."""
    return {
        "id": new_id("msg").replace("-", "_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


@dataclass
class EventStream:
    """A reply's streaming events, from the parsed deltas: one content block per run of
    thinking or text, one per tool call (its input in one `input_json_delta`)."""

    index: int = -1  # the open block's, or the last one's
    open: str | None = None  # the open block's type
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def add(self, delta: Delta) -> list[tuple[str, dict[str, Any]]]:
        """The events of `delta`, as (event name, data)."""
        self.events = []
        if delta.reasoning:
            self._block("thinking", {"thinking": "", "signature": ""})
            self._delta({"type": "thinking_delta", "thinking": delta.reasoning})
        if delta.content:
            self._block("text", {"text": ""})
            self._delta({"type": "text_delta", "text": delta.content})
        for call in delta.tool_calls:
            self._block("tool_use", {"id": call.id, "name": call.name, "input": {}}, new=True)
            self._delta({"type": "input_json_delta", "partial_json": call.arguments})
        return self.events

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        """The open block's `content_block_stop`."""
        self.events = []
        self._close()
        return self.events

    def _block(self, kind: str, start: dict[str, Any], new: bool = False) -> None:
        if self.open == kind and not new:
            return
        self._close()
        self.index += 1
        self.open = kind
        block = {"type": kind, **start}
        self.events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": block},
            )  # fmt: skip
        )

    def _delta(self, delta: dict[str, Any]) -> None:
        data = {"type": "content_block_delta", "index": self.index, "delta": delta}
        self.events.append(("content_block_delta", data))

    def _close(self) -> None:
        if self.open is not None:
            data = {"type": "content_block_stop", "index": self.index}
            self.events.append(("content_block_stop", data))
            self.open = None


def message_delta(stop: str | None, stop_sequence: str | None, output_tokens: int) -> dict:
    """The `message_delta` event's data: how the reply ended and its output tokens."""
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": stop_sequence},
        "usage": {"output_tokens": output_tokens},
    }


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event, named as Anthropic's streams name them."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
