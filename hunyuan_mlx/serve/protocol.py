"""OpenAI's API as this server speaks it: request validation (errors name the field) and the
JSON shapes of replies, stream chunks, usage and errors."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .parser import Delta, ToolCall
from .reasoning import REASONING_EFFORT_BUDGETS

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "none", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # chat; the legacy completions API allows 5
MAX_COMPLETION_LOGPROBS = 5
MAX_CHOICES = 16  # n: the choices of one request, decoded together in the batch
MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
# Request field -> (GenerationSettings field, lowest, highest, integer, open low end).
SAMPLING_FIELDS: dict[str, tuple[str, float, float, bool, bool]] = {
    "temperature": ("temp", 0.0, math.inf, False, False),
    "top_p": ("top_p", 0.0, 1.0, False, True),
    "top_k": ("top_k", 0, math.inf, True, False),
    "min_p": ("min_p", 0.0, 1.0, False, False),
    "repetition_penalty": ("repetition_penalty", 0.0, math.inf, False, True),
}


class APIError(Exception):
    """An error for the client: HTTP status, message and the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str, message: str) -> APIError:
    """A 400 about one request field."""
    return APIError(400, message, param=param)


@dataclass
class Request:
    """A validated chat or completion request; `sampling` holds GenerationSettings overrides."""

    chat: bool
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    max_tokens_field: str | None = None  # the field that set max_tokens, if one did
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt: str | list[int] | None = None
    # Structured output: "json" (`json_schema`, None for any object) or "tools" (a tool block
    # under `tool_choice`: "auto" constrains only when a tool is strict, "required", or a name).
    structured: str | None = None
    json_schema: dict[str, Any] | None = None
    tool_choice: str = "auto"
    thinking_budget: int | None = None  # tokens of thinking before its closing is forced


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(
    body: dict[str, Any], name: str, low: float, high: float, integer: bool, open_low: bool
) -> Any:
    """Field `name`, refused unless a number (an integer, with `integer`) within the bounds."""
    value = body[name]
    if integer and not _is_int(value):
        raise invalid(name, f"{name} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise invalid(name, f"{name} must be a number, got {value!r}")
    too_low = value <= low if open_low else value < low
    if too_low or value > high or (isinstance(value, float) and math.isnan(value)):
        low_bracket = "(" if open_low else "["
        high_text = "inf)" if math.isinf(high) else f"{high}]"
        raise invalid(name, f"{name} must be in {low_bracket}{low}, {high_text}, got {value!r}")
    return value


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false, got {value!r}")
    return value


def _common(body: dict[str, Any], request: Request) -> None:
    """The fields chat and completion requests share."""
    request.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options", "stream_options must be an object")
        if not request.stream:
            raise invalid("stream_options", "stream_options is only allowed with stream: true")
        request.include_usage = _bool(options, "include_usage")
    if body.get("n") is not None:
        request.n = _number(body, "n", 1, MAX_CHOICES, True, False)
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            request.sampling["max_tokens"] = _number(body, name, 1, math.inf, True, False)
            request.max_tokens_field = name
            break
    for name, (setting, low, high, integer, open_low) in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            request.sampling[setting] = _number(body, name, low, high, integer, open_low)
    if body.get("seed") is not None:
        request.seed = _number(body, "seed", 0, MAX_SEED, True, False)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise invalid("stop", "stop must be a non-empty string or a list of them")
        if len(stop) > MAX_STOP_STRINGS:
            raise invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings")
        request.stop = stop


def _text_content(value: Any, param: str) -> str | None:
    """A message's content as text: a string, or a list of text parts joined."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"{param}[{i}]", "Only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise invalid(f"{param}[{i}].text", "A text part needs a string text")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(param, "content must be a string or a list of text parts")


def _tool_call_history(calls: Any, param: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, as the chat template reads them."""
    if not isinstance(calls, list):
        raise invalid(param, "tool_calls must be a list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"{param}[{i}].function", "A tool call needs a function with a name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise invalid(f"{param}[{i}].function.arguments", "arguments must be a JSON string")
        out.append({"id": call.get("id"), "type": "function", "function": dict(function)})
    return out


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(param, "Each message must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(
                f"{param}.role", f"Unknown role {role!r}; expected one of {', '.join(ROLES)}"
            )
        content = _text_content(message.get("content"), f"{param}.content")
        entry: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": content or "",
        }
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = _tool_call_history(message["tool_calls"], f"{param}.tool_calls")
        elif content is None:
            raise invalid(f"{param}.content", f"A {role} message needs content")
        out.append(entry)
    return out


def tool_list(value: Any) -> list[Any]:
    """A request's `tools`: a list, or nothing (None) as an empty one."""
    if value is not None and not isinstance(value, list):
        raise invalid("tools", "tools must be a list")
    return value or []


def _tools(value: Any) -> list[dict[str, Any]] | None:
    value = tool_list(value)
    for i, tool in enumerate(value):
        is_function = isinstance(tool, dict) and tool.get("type", "function") == "function"
        function = tool.get("function") if is_function else None
        if not isinstance(function, dict):
            raise invalid(f"tools[{i}]", "Each tool must be {'type': 'function', 'function': ...}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise invalid(f"tools[{i}].function.name", "A tool needs a name")
    return value or None


def parse_chat(body: dict[str, Any]) -> Request:
    """A /v1/chat/completions body, validated."""
    request = Request(chat=True)
    _common(body, request)
    request.messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice", "auto"), tools)
    # "none" leaves the tools out of the prompt, so the model is not in tool mode at all.
    request.tools = tools if choice != "none" else None
    request.tool_choice = choice
    if request.tools is not None:
        request.structured = "tools"
    _response_format(body.get("response_format"), request)
    request.thinking_budget = _thinking_budget(body)
    if _bool(body, "logprobs"):
        top = body.get("top_logprobs")
        request.top_logprobs = (
            0 if top is None else _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, True, False)
        )
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise invalid("chat_template_kwargs", "chat_template_kwargs must be an object")
        if not isinstance(kwargs.get("enable_thinking", False), bool):
            raise invalid(
                "chat_template_kwargs.enable_thinking", "enable_thinking must be true or false"
            )
        request.template_kwargs = dict(kwargs)
    if body.get("enable_thinking") is not None:  # as vLLM and SGLang take it, beside the kwargs
        request.template_kwargs["enable_thinking"] = _bool(body, "enable_thinking")
    return request


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str:
    """OpenAI's `tool_choice` as "auto", "none", "required" or the name of the tool to call."""
    if isinstance(value, dict):
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if value.get("type") != "function" or not isinstance(name, str):
            raise invalid("tool_choice", "A named tool_choice is {'type': 'function', "
                          "'function': {'name': ...}}")  # fmt: skip
        if name not in [t["function"]["name"] for t in tools or []]:
            raise invalid("tool_choice.function.name", f"No tool named {name!r} in tools")
        return name
    if value not in TOOL_CHOICES:
        raise invalid("tool_choice", f"tool_choice must be one of {', '.join(TOOL_CHOICES)} "
                      "or a named function")  # fmt: skip
    if value == "required" and not tools:
        raise invalid("tool_choice", "tool_choice 'required' needs tools")
    return value


def _response_format(value: Any, request: Request) -> None:
    """OpenAI's `response_format`: plain text, any JSON object, or JSON under a schema."""
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise invalid("response_format.type", f"response_format.type must be one of "
                      f"{', '.join(RESPONSE_FORMATS)}")  # fmt: skip
    if kind == "text":
        return
    if request.structured == "tools":
        raise invalid("response_format", "response_format cannot be combined with tools")
    request.structured = "json"
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema.schema", "json_schema needs a schema object")
        request.json_schema = schema


def _thinking_budget(body: dict[str, Any]) -> int | None:
    """`max_thinking_tokens`, or OpenAI's `reasoning_effort` as a budget."""
    if body.get("max_thinking_tokens") is not None:
        return _number(body, "max_thinking_tokens", 0, math.inf, True, False)
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in REASONING_EFFORT_BUDGETS:
        raise invalid("reasoning_effort", f"reasoning_effort must be one of "
                      f"{', '.join(REASONING_EFFORT_BUDGETS)}")  # fmt: skip
    return REASONING_EFFORT_BUDGETS[effort]


def parse_completion(body: dict[str, Any]) -> Request:
    """A /v1/completions body, validated; the prompt is text or token ids."""
    request = Request(chat=False)
    _common(body, request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        request.prompt = prompt
    elif isinstance(prompt, str) and prompt:
        request.prompt = prompt
    else:
        raise invalid("prompt", "prompt must be a non-empty string or list of token ids")
    if body.get("logprobs") is not None:
        request.top_logprobs = _number(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, True, False)
    if body.get("echo"):
        raise invalid("echo", "echo is not supported")
    if body.get("suffix"):
        raise invalid("suffix", "suffix is not supported")
    return request


def new_id(prefix: str) -> str:
    """A unique response id, as OpenAI shapes them."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """`created` timestamps: seconds since the epoch."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """Token counts, with the prompt tokens the prompt cache supplied."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def tool_call(call: ToolCall, streamed: bool) -> dict[str, Any]:
    """A tool call as a message (or, `streamed`, a delta with its index) carries it."""
    out: dict[str, Any] = {"index": call.index} if streamed else {}
    out.update(
        id=call.id, type="function", function={"name": call.name, "arguments": call.arguments}
    )
    return out


def reasoning_fields(text: str) -> dict[str, str]:
    """The thinking under both names clients read: `reasoning_content` (DeepSeek's, vLLM's
    older) and `reasoning` (vLLM's and OpenRouter's)."""
    return {"reasoning_content": text, "reasoning": text}


def message(delta: Delta) -> dict[str, Any]:
    """The assistant message of a whole reply."""
    out: dict[str, Any] = {"role": "assistant", "content": delta.content or None}
    if delta.reasoning:
        out.update(reasoning_fields(delta.reasoning))
    if delta.tool_calls:
        out["tool_calls"] = [tool_call(c, streamed=False) for c in delta.tool_calls]
    return out


def delta_chunks(delta: Delta) -> list[dict[str, Any]]:
    """Stream deltas of a parsed piece: reasoning, content, then each tool call."""
    out: list[dict[str, Any]] = []
    if delta.reasoning:
        out.append(reasoning_fields(delta.reasoning))
    if delta.content:
        out.append({"content": delta.content})
    out += [{"tool_calls": [tool_call(c, streamed=True)]} for c in delta.tool_calls]
    return out


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def chat_logprobs(
    entries: Sequence[TokenLogprob], token_bytes: Callable[[int], bytes]
) -> dict[str, Any]:
    """Chat's `logprobs` object: one entry per token, its bytes included (a token may hold
    part of a character)."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(token)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
        }

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def completion_logprobs(
    entries: Sequence[TokenLogprob], token_bytes: Callable[[int], bytes], offset: int
) -> dict[str, Any]:
    """The legacy completions API's `logprobs` object; `offset` is where the first token's
    text starts in the reply."""
    tokens = [token_bytes(e.token).decode("utf-8", errors="replace") for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            {token_bytes(t).decode("utf-8", errors="replace"): lp for t, lp in e.top}
            for e in entries
        ],
        "text_offset": offsets,
    }
