"""The HTTP side: OpenAI's endpoints on the standard library's `ThreadingHTTPServer`.

Each connection has its own thread, which validates the request, renders the prompt, submits a
job to the engine and turns the job's tokens into a reply (JSON or server-sent events) through
the output parser. No MLX work happens here.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import queue
import select
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jinja2.exceptions import TemplateError

from ..generation.settings import GenerationSettings
from ..tokenizer import HunYuanTokenizer
from .engine import Engine, Job, Started, Token
from .parser import Delta, OutputParser, StopStrings
from .protocol import (
    APIError,
    Request,
    TokenLogprob,
    chat_logprobs,
    completion_logprobs,
    delta_chunks,
    invalid,
    message,
    new_id,
    now,
    parse_chat,
    parse_completion,
    usage,
)

DEFAULT_HOST = "127.0.0.1"  # mlx-lm server's
DEFAULT_PORT = 8080  # mlx-lm server's
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
MODEL_ALIASES = ("default_model",)  # the name mlx-lm's server answers to whatever it serves
OWNER = "hunyuan-mlx"
# How often a waiting request thread checks that its client is still connected.
POLL_SECONDS = 0.1
NO_EVENT = object()  # what a wait for a job's event that timed out gives
# chat_template_kwargs that are not the client's to set.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "tokenize", "return_dict", "strftime_now")
ROUTES = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}

log = logging.getLogger(__name__)


def template_clock(fmt: str) -> str:
    """The chat template's `strftime_now`, to the minute: in tool mode the template writes the
    time into the first message, and to the second it would change the prompt's start every
    second, leaving the prompt cache nothing of the conversation to reuse."""
    return datetime.now().replace(second=0, microsecond=0).strftime(fmt)


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body: one JSON object."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object")
    return body


class ClientGone(Exception):
    """The client closed its connection: its job is cancelled and nothing more is sent."""


class Service:
    """What the request threads share: the model's name and limits, tokenizer, default
    generation settings, template arguments, API key and the engine."""

    def __init__(
        self,
        model_id: str,
        model: Any,
        tokenizer: HunYuanTokenizer,
        engine: Engine,
        defaults: GenerationSettings,
        template_args: dict[str, Any] | None = None,
        api_key: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.model_id = model_id
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.defaults = defaults
        self.template_args = dict(template_args or {})
        reserved = [k for k in RESERVED_TEMPLATE_KWARGS if k in self.template_args]
        if reserved:
            raise ValueError(f"The chat template arguments cannot set {', '.join(reserved)}")
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.created = now()

    def check_model(self, name: Any) -> None:
        """Refuse a request naming a model this server does not serve."""
        if name is not None and name != self.model_id and name not in MODEL_ALIASES:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def prompt(self, request: Request) -> list[int]:
        """The prompt's token ids (chat: through the chat template), refused when longer than
        the context."""
        if request.chat:
            param = "messages"
            for key in RESERVED_TEMPLATE_KWARGS:
                if key in request.template_kwargs:
                    raise invalid(f"chat_template_kwargs.{key}", f"{key} cannot be set here")
            kwargs = {**self.template_args, **request.template_kwargs}
            try:
                ids = self.tokenizer.apply_chat_template(
                    request.messages, tools=request.tools, strftime_now=template_clock, **kwargs
                )
            except TemplateError as e:
                raise invalid(param, f"The chat template refused the messages: {e}") from None
        else:
            param = "prompt"
            prompt = request.prompt
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt or [])
            if max(ids) >= self.tokenizer.vocab_size:
                raise invalid(param, f"Token ids must be < {self.tokenizer.vocab_size}")
        try:
            self.defaults.check_prompt_fits(len(ids), self.model)
        except ValueError as e:
            raise APIError(400, str(e), param, code="context_length_exceeded") from None
        return ids

    def settings(self, request: Request) -> GenerationSettings:
        """The server's defaults with the request's length and sampling fields."""
        try:
            return dataclasses.replace(self.defaults, **request.sampling)
        except ValueError as e:
            raise APIError(400, str(e)) from None


class Reply:
    """One request's reply built from its job's events: stop strings cut the text, the chat
    output is parsed, tokens, log-probabilities and the finish reason are counted."""

    def __init__(self, request: Request, job: Job) -> None:
        self.job = job
        self.parser = OutputParser(tools=request.tools is not None) if request.chat else None
        self.stops = StopStrings(request.stop)
        self.total = Delta()
        self.logprobs: list[TokenLogprob] = []
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def add(self, event: Started | Token) -> Delta:
        """What `event` adds to the reply (parsed, for chat; raw text in `content` otherwise)."""
        if isinstance(event, Started):
            self.cached_tokens = event.cached_tokens
            return Delta()
        if self.finish_reason is not None:
            return Delta()  # run by the engine before it saw the stop string's cancel
        self.completion_tokens += 1
        # The eos token ends the reply; it is not part of it.
        if event.logprob is not None and event.finish_reason != "stop":
            self.logprobs.append(event.logprob)
        text, stopped = self.stops.feed(event.text)
        if stopped:
            self.finish_reason = "stop"
            self.job.cancelled.set()
        elif event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            text += self.stops.flush()
        delta = self.parser.feed(text) if self.parser else Delta(content=text)
        if self.finish_reason is not None and self.parser:
            delta.extend(self.parser.finish())
        self.total.extend(delta)
        if self.finish_reason is not None and self.total.tool_calls:
            self.finish_reason = "tool_calls"
        return delta

    def usage(self) -> dict[str, Any]:
        """The usage object of this reply."""
        return usage(len(self.job.prompt), self.completion_tokens, self.cached_tokens)


class Handler(BaseHTTPRequestHandler):
    """OpenAI's endpoints: POST /v1/chat/completions and /v1/completions, GET /v1/models and
    /health."""

    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s - %s", self.address_string(), format % args)

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self._cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        service = self.server.service
        try:
            if path == "/health":
                self._send_json(200, {"status": "ok"})
                return
            self._authorize()
            if path != "/v1/models":
                raise APIError(404, f"No such endpoint: GET {path}", code="not_found")
            model = {
                "id": service.model_id,
                "object": "model",
                "created": service.created,
                "owned_by": OWNER,
            }
            self._send_json(200, {"object": "list", "data": [model]})
        except APIError as e:
            self._send_json(e.status, e.body())

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        service = self.server.service
        raw = None
        try:
            self._authorize()
            if path not in ROUTES:
                raise APIError(404, f"No such endpoint: POST {path}", code="not_found")
            raw = self._read_body()
            body = parse_json(raw)
            request = ROUTES[path](body)
            service.check_model(body.get("model"))
            job = Job(
                prompt=service.prompt(request),
                settings=service.settings(request),
                seed=request.seed,
                top_logprobs=request.top_logprobs,
            )
        except APIError as e:
            if raw is None:
                # The body is left unread, so the connection cannot carry another request.
                self.close_connection = True
            self._send_json(e.status, e.body())
            return
        service.engine.submit(job)
        try:
            if request.stream:
                self._stream(request, job)
            else:
                self._complete(request, job)
        except ClientGone:
            job.cancelled.set()
            self.close_connection = True

    def _authorize(self) -> None:
        key = self.server.service.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(
                401, "Missing or incorrect API key (Authorization: Bearer)", code="invalid_api_key"
            )

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise APIError(411, "The request needs a Content-Length header")
        limit = self.server.service.max_request_bytes
        if int(length) > limit:
            raise APIError(413, f"The request body is over {limit} bytes", code="body_too_large")
        return self.rfile.read(int(length))

    def _events(self, job: Job) -> Iterator[Started | Token]:
        """The job's events until it ends; every `POLL_SECONDS` checks that the client is still
        there (a client waiting for a whole reply is otherwise never written to)."""
        checked = time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                event = NO_EVENT
            if event is NO_EVENT or time.monotonic() - checked >= POLL_SECONDS:
                checked = time.monotonic()
                if self._client_gone():
                    raise ClientGone
            if event is None:
                return
            if isinstance(event, Exception):
                raise event
            if event is not NO_EVENT:
                yield event

    def _client_gone(self) -> bool:
        """Whether the client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _complete(self, request: Request, job: Job) -> None:
        reply = Reply(request, job)
        try:
            for event in self._events(job):
                reply.add(event)
        except ClientGone:
            raise
        except Exception as e:  # the engine failed on this request
            log.exception("generation failed")
            self._send_json(500, APIError(500, str(e), kind="server_error").body())
            return
        tokenizer = self.server.service.tokenizer
        logprobs = None
        if request.top_logprobs is not None:
            logprobs = (
                chat_logprobs(reply.logprobs, tokenizer.token_bytes.__getitem__)
                if request.chat
                else completion_logprobs(reply.logprobs, tokenizer.token_bytes.__getitem__, 0)
            )
        choice: dict[str, Any] = {"index": 0}
        if request.chat:
            choice["message"] = message(reply.total)
        else:
            choice["text"] = reply.total.content
        choice.update(logprobs=logprobs, finish_reason=reply.finish_reason)
        self._send_json(
            200,
            {
                "id": new_id("chatcmpl" if request.chat else "cmpl"),
                "object": "chat.completion" if request.chat else "text_completion",
                "created": now(),
                "model": self.server.service.model_id,
                "choices": [choice],
                "usage": reply.usage(),
            },
        )

    def _stream(self, request: Request, job: Job) -> None:
        self.send_response(200)
        self._cors_headers()
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        service = self.server.service
        token_bytes = service.tokenizer.token_bytes.__getitem__
        reply = Reply(request, job)
        head = {
            "id": new_id("chatcmpl" if request.chat else "cmpl"),
            "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": now(),
            "model": service.model_id,
        }
        sent_logprobs = 0
        text_offset = 0

        def choice(part: dict[str, Any] | str | None, finish_reason: str | None = None):
            nonlocal sent_logprobs, text_offset
            new = reply.logprobs[sent_logprobs:]
            logprobs = None
            if request.top_logprobs is not None and (new or finish_reason):
                sent_logprobs = len(reply.logprobs)
                if request.chat:
                    logprobs = chat_logprobs(new, token_bytes)
                else:
                    logprobs = completion_logprobs(new, token_bytes, text_offset)
            out: dict[str, Any] = {"index": 0}
            if request.chat:
                out["delta"] = part or {}
            else:
                out["text"] = part or ""
                text_offset += len(out["text"])
            out.update(logprobs=logprobs, finish_reason=finish_reason)
            return {**head, "choices": [out]}

        if request.chat:
            self._send_event(choice({"role": "assistant", "content": ""}))
        try:
            for event in self._events(job):
                delta = reply.add(event)
                parts = (
                    delta_chunks(delta)
                    if request.chat
                    else [delta.content]
                    if delta.content
                    else []
                )
                for part in parts:
                    self._send_event(choice(part))
        except ClientGone:
            raise
        except Exception as e:
            log.exception("generation failed")
            self._send_event(APIError(500, str(e), kind="server_error").body())
            self._send_raw(b"data: [DONE]\n\n")
            return
        self._send_event(choice(None, reply.finish_reason))
        if request.include_usage:
            self._send_event({**head, "choices": [], "usage": reply.usage()})
        self._send_raw(b"data: [DONE]\n\n")

    def _send_event(self, data: dict[str, Any]) -> None:
        self._send_raw(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

    def _send_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ClientGone from e

    def _cors_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self._cors_headers()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    """A threading HTTP server whose handlers reach `service`."""

    daemon_threads = True
    # socketserver's default backlog of 5 resets connections when more clients arrive at once.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, address: tuple[str, int], service: Service) -> None:
        super().__init__(address, Handler)
        self.service = service
