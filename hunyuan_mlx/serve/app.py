"""The HTTP side: OpenAI's endpoints and Anthropic's /v1/messages as a FastAPI app, served by
uvicorn.

A route validates the request (`protocol`), renders the prompt, submits one job per choice to
the engine and turns the jobs' events into a reply (JSON or server-sent events) through the
output parser. The events cross from the engine's thread to the event loop through a `Channel`;
no MLX work happens here. A client that goes away cancels its jobs at once, which frees their
places in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from starlette.exceptions import HTTPException

from ..generation.settings import GenerationSettings
from ..interrupts import handling
from ..tokenizer import HunYuanTokenizer
from . import anthropic
from .engine import Engine, EngineClosed, Job, Started, Token
from .grammar import constraints
from .parser import Delta, OutputParser, StopStrings
from .protocol import (
    MAX_SEED,
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
from .reasoning import template_variables

DEFAULT_HOST = "127.0.0.1"  # mlx-lm server's
DEFAULT_PORT = 8080  # mlx-lm server's
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
MODEL_ALIASES = ("default_model",)  # the name mlx-lm's server answers to whatever it serves
OWNER = "hunyuan-mlx"
MESSAGES_ROUTE = "/v1/messages"  # Anthropic's API: its errors take Anthropic's shape
# chat_template_kwargs that are not the client's to set.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "tokenize", "return_dict", "strftime_now")
# How long a stopping server waits for its open requests (ended at their next token) to send
# their last words before it closes their connections.
SHUTDOWN_GRACE_SECONDS = 10
# How long an idle keep-alive connection stays open: longer than clients keep one in their pool
# (httpx, under the openai and anthropic clients: 5 s, as uvicorn's default), so that the client
# closes it first and a request never goes out on a connection the server is closing (a reset).
KEEP_ALIVE_SECONDS = 75

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


class Channel:
    """One request's job events, put by the engine's thread and read on the event loop as
    (choice index, event); a job's end is its None."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.ended = False  # every job has ended (or one failed)

    def sink(self, index: int) -> _Sink:
        """What choice `index`'s job puts its events into."""
        return _Sink(self, index)

    def put(self, index: int, event: Any) -> None:
        """From any thread: queue `event` of choice `index`."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

    async def events(self, jobs: int) -> AsyncIterator[tuple[int, Started | Token | None]]:
        """The events of `jobs` jobs, each job's None included, until all have ended; a job's
        exception is raised."""
        while jobs:
            index, event = await self._queue.get()
            if isinstance(event, Exception):
                self.ended = True
                raise event
            jobs -= event is None
            self.ended = not jobs
            yield index, event


@dataclasses.dataclass(frozen=True)
class _Sink:
    """A job's `events` as the engine sees them: a `put` that tags them with the choice."""

    channel: Channel
    index: int

    def put(self, event: Any) -> None:
        self.channel.put(self.index, event)


class Service:
    """What the routes share: the model's name and limits, tokenizer, default generation
    settings, template arguments, API key and the engine."""

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
            if self.tokenizer.chat_template is None:  # a checkpoint without tokenizer_config.json
                raise invalid(
                    param,
                    "The model has no chat template (tokenizer_config.json): send a prompt to "
                    "/v1/completions instead",
                )
            for key in RESERVED_TEMPLATE_KWARGS:
                if key in request.template_kwargs:
                    raise invalid(f"chat_template_kwargs.{key}", f"{key} cannot be set here")
            kwargs = self.template_kwargs(request)
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

    def constraints(self, request: Request) -> dict[str, Any]:
        """The job's grammar and thinking budget (`grammar.constraints`)."""
        if not request.chat:
            return {}
        return constraints(request, self.template_kwargs(request), self.engine.grammars)

    def template_kwargs(self, request: Request) -> dict[str, Any]:
        """The chat template's variables for `request` (`reasoning.template_variables`)."""
        return template_variables(self.template_args, request.messages, request.template_kwargs)

    def settings(self, request: Request, prompt_tokens: int) -> GenerationSettings:
        """The server's defaults with the request's length and sampling fields; a max_tokens
        that the context cannot hold after the prompt is refused, as OpenAI does."""
        try:
            settings = dataclasses.replace(self.defaults, **request.sampling)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        context = self.model.config.max_position_embeddings
        if request.max_tokens_field and prompt_tokens + settings.max_tokens > context:
            raise APIError(
                400,
                f"{request.max_tokens_field} is {settings.max_tokens}, but the context holds "
                f"{context} tokens and the prompt takes {prompt_tokens}: at most "
                f"{context - prompt_tokens}",
                param=request.max_tokens_field,
                code="context_length_exceeded",
            )
        return settings

    def jobs(self, request: Request, channel: Channel) -> list[Job]:
        """One job per choice (`n`), whose events go to `channel`; with a seed, choice i
        samples with seed + i, so that the choices differ and each repeats."""
        prompt = self.prompt(request)
        settings = self.settings(request, len(prompt))
        constrained = self.constraints(request)
        return [
            Job(
                prompt=prompt,
                settings=settings,
                seed=None if request.seed is None else (request.seed + i) % (MAX_SEED + 1),
                top_logprobs=request.top_logprobs,
                events=channel.sink(i),
                **constrained,
            )
            for i in range(request.n)
        ]


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


def total_usage(replies: list[Reply]) -> dict[str, Any]:
    """The usage of a request's choices: the prompt once, the completions summed."""
    return usage(
        len(replies[0].job.prompt),
        sum(r.completion_tokens for r in replies),
        replies[0].cached_tokens,
    )


class StreamedChoice:
    """One choice of a streamed reply: its chunks, with the log-probabilities of the tokens not
    yet sent (the completions API also counts the text's offset)."""

    def __init__(self, request: Request, reply: Reply, index: int, head: dict[str, Any]) -> None:
        self.request = request
        self.reply = reply
        self.index = index
        self.head = head
        self.sent_logprobs = 0
        self.text_offset = 0

    def chunk(
        self,
        part: dict[str, Any] | str | None,
        token_bytes: Callable[[int], bytes],
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        """A chunk carrying `part` (a chat delta or completion text)."""
        new = self.reply.logprobs[self.sent_logprobs :]
        logprobs = None
        if self.request.top_logprobs is not None and (new or finish_reason):
            self.sent_logprobs = len(self.reply.logprobs)
            if self.request.chat:
                logprobs = chat_logprobs(new, token_bytes)
            else:
                logprobs = completion_logprobs(new, token_bytes, self.text_offset)
        out: dict[str, Any] = {"index": self.index}
        if self.request.chat:
            out["delta"] = part or {}
        else:
            out["text"] = part or ""
            self.text_offset += len(out["text"])
        out.update(logprobs=logprobs, finish_reason=finish_reason)
        return {**self.head, "choices": [out]}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def failure(e: Exception) -> APIError:
    """What the client is told of a job that failed: a stopping server, or the engine's error."""
    if isinstance(e, EngineClosed):
        return APIError(503, str(e), kind="server_error", code="server_stopping")
    log.error("generation failed", exc_info=e)
    return APIError(500, str(e), kind="server_error")


async def cancel_when_gone(http: HTTPRequest, jobs: list[Job], channel: Channel) -> None:
    """Wait for the client to disconnect (the request body has been read: the next message is
    the disconnect), then cancel `jobs`; a reply that went out in full ends the wait too."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    if not channel.ended:
        log.info("%s went away: its request is cancelled", client_name(http))
        for job in jobs:
            job.cancelled.set()


def client_name(http: HTTPRequest) -> str:
    """host:port of the request's client."""
    return f"{http.client.host}:{http.client.port}" if http.client else "a client"


async def complete(service: Service, request: Request, jobs: list[Job], channel: Channel):
    """The whole reply of a request that does not stream."""
    replies = [Reply(request, job) for job in jobs]
    try:
        async for index, event in channel.events(len(jobs)):
            if event is not None:
                replies[index].add(event)
    except Exception as e:  # the engine failed on this request, or is stopping
        error = failure(e)
        return JSONResponse(error.body(), status_code=error.status)
    token_bytes = service.tokenizer.token_bytes.__getitem__
    choices = []
    for index, reply in enumerate(replies):
        logprobs = None
        if request.top_logprobs is not None:
            logprobs = (
                chat_logprobs(reply.logprobs, token_bytes)
                if request.chat
                else completion_logprobs(reply.logprobs, token_bytes, 0)
            )
        choice: dict[str, Any] = {"index": index}
        if request.chat:
            choice["message"] = message(reply.total)
        else:
            choice["text"] = reply.total.content
        choice.update(logprobs=logprobs, finish_reason=reply.finish_reason)
        choices.append(choice)
    return {
        "id": new_id("chatcmpl" if request.chat else "cmpl"),
        "object": "chat.completion" if request.chat else "text_completion",
        "created": now(),
        "model": service.model_id,
        "choices": choices,
        "usage": total_usage(replies),
    }


async def stream(
    service: Service, request: Request, jobs: list[Job], channel: Channel
) -> AsyncIterator[str]:
    """The server-sent events of a streamed reply: each choice's chunks, its last one with its
    finish reason, the usage if asked for, then [DONE]; a failure is an error event."""
    head = {
        "id": new_id("chatcmpl" if request.chat else "cmpl"),
        "object": "chat.completion.chunk" if request.chat else "text_completion",
        "created": now(),
        "model": service.model_id,
    }
    token_bytes = service.tokenizer.token_bytes.__getitem__
    replies = [Reply(request, job) for job in jobs]
    choices = [StreamedChoice(request, r, i, head) for i, r in enumerate(replies)]
    try:
        if request.chat:
            for choice in choices:
                yield sse(choice.chunk({"role": "assistant", "content": ""}, token_bytes))
        async for index, event in channel.events(len(jobs)):
            choice = choices[index]
            if event is None:
                yield sse(choice.chunk(None, token_bytes, choice.reply.finish_reason))
                continue
            delta = choice.reply.add(event)
            if request.chat:
                parts: list[Any] = delta_chunks(delta)
            else:
                parts = [delta.content] if delta.content else []
            for part in parts:
                yield sse(choice.chunk(part, token_bytes))
    except Exception as e:  # the engine failed on this request, or is stopping
        yield sse(failure(e).body())
        yield sse("[DONE]")
        return
    finally:  # also when the client went away and the response was cancelled
        for job in jobs:
            job.cancelled.set()
    if request.include_usage:
        yield sse({**head, "choices": [], "usage": total_usage(replies)})
    yield sse("[DONE]")


async def read_body(http: HTTPRequest, limit: int) -> bytes:
    """The request body, refused once over `limit` bytes (before reading it, when its length
    is declared)."""
    length = http.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"The request body is over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for piece in http.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"The request body is over {limit} bytes", code="body_too_large")
    http.state.body_read = True
    return bytes(body)


async def read_request(
    http: HTTPRequest, parse: Callable[[dict[str, Any]], Request]
) -> tuple[Service, Request]:
    """The server's service and the request's body validated with `parse`, refused if it names
    a model this server does not serve."""
    service: Service = http.app.state.service
    body = parse_json(await read_body(http, service.max_request_bytes))
    request = parse(body)
    service.check_model(body.get("model"))
    return service, request


async def respond(
    http: HTTPRequest,
    parse: Callable[[dict[str, Any]], Request],
    whole: Callable[..., Awaitable[Any]] = complete,
    events: Callable[..., AsyncIterator[str]] = stream,
) -> Response:
    """Validate a generation request with `parse`, run its jobs and reply: `whole` builds a
    whole reply, `events` a stream's (OpenAI's by default)."""
    service, request = await read_request(http, parse)
    channel = Channel()
    jobs = service.jobs(request, channel)
    for job in jobs:
        service.engine.submit(job)
    watch = asyncio.create_task(cancel_when_gone(http, jobs, channel))
    if request.stream:
        return StreamingResponse(
            events(service, request, jobs, channel),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            background=BackgroundCancel(watch),
        )
    try:
        reply = await whole(service, request, jobs, channel)
    finally:
        watch.cancel()
    return reply if isinstance(reply, Response) else JSONResponse(reply)


class BackgroundCancel:
    """A response's background task that cancels `task` once the response has gone out."""

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task

    async def __call__(self) -> None:
        self.task.cancel()


async def authorize(http: HTTPRequest) -> None:
    """Refuse a request without the server's API key (when it has one)."""
    service: Service = http.app.state.service
    key = service.api_key
    if key is None:
        return
    bearer = http.headers.get("authorization", "")
    anthropic_key = http.headers.get("x-api-key", "")  # how Anthropic's clients send it
    if not (
        hmac.compare_digest(bearer.encode(), f"Bearer {key}".encode())
        or hmac.compare_digest(anthropic_key.encode(), key.encode())
    ):
        # Read the body first: refused unread, the connection closes under the client's body,
        # and a body that arrives after the close makes the client see a reset, not the 401 (a
        # test's anthropic client did). Over the size limit it stays unread, and that is all.
        with contextlib.suppress(APIError):
            await read_body(http, service.max_request_bytes)
        raise APIError(
            401,
            "Missing or incorrect API key (Authorization: Bearer, or x-api-key)",
            code="invalid_api_key",
        )


async def health() -> dict[str, str]:
    """GET /health: the server is up (no API key needed)."""
    return {"status": "ok"}


async def models(http: HTTPRequest) -> dict[str, Any]:
    """GET /v1/models: the one model served."""
    service: Service = http.app.state.service
    model = {
        "id": service.model_id,
        "object": "model",
        "created": service.created,
        "owned_by": OWNER,
    }
    return {"object": "list", "data": [model]}


async def chat_completions(http: HTTPRequest) -> Response:
    """POST /v1/chat/completions."""
    return await respond(http, parse_chat)


async def completions(http: HTTPRequest) -> Response:
    """POST /v1/completions."""
    return await respond(http, parse_completion)


async def messages(http: HTTPRequest) -> Response:
    """POST /v1/messages: Anthropic's Messages API."""
    return await respond(http, anthropic.parse_messages, anthropic_message, anthropic_events)


async def count_tokens(http: HTTPRequest) -> dict[str, int]:
    """POST /v1/messages/count_tokens: how many tokens a Messages request's prompt takes (agent
    tools ask before they send a long conversation)."""
    service, request = await read_request(http, anthropic.parse_count_tokens)
    return {"input_tokens": len(service.prompt(request))}


def anthropic_usage(reply: Reply) -> dict[str, int]:
    return anthropic.usage(len(reply.job.prompt), reply.cached_tokens, reply.completion_tokens)


async def anthropic_message(service: Service, request: Request, jobs: list[Job], channel: Channel):
    """The whole reply of a /v1/messages request that does not stream."""
    reply = Reply(request, jobs[0])
    try:
        async for _, event in channel.events(1):
            if event is not None:
                reply.add(event)
    except Exception as e:  # the engine failed on this request, or is stopping
        error = failure(e)
        return JSONResponse(anthropic.error_body(error), status_code=error.status)
    matched = reply.stops.matched
    return anthropic.message(
        service.model_id,
        anthropic.content_blocks(reply.total),
        anthropic.stop_reason(reply.finish_reason, matched),
        matched,
        anthropic_usage(reply),
    )


async def anthropic_events(
    service: Service, request: Request, jobs: list[Job], channel: Channel
) -> AsyncIterator[str]:
    """The events of a streamed /v1/messages reply: message_start, its content blocks,
    message_delta and message_stop; a failure is an error event."""
    reply = Reply(request, jobs[0])
    blocks = anthropic.EventStream()
    try:
        async for _, event in channel.events(1):
            if isinstance(event, Started):
                reply.add(event)
                start = anthropic.message(service.model_id, [], None, None, anthropic_usage(reply))
                yield anthropic.sse("message_start", {"type": "message_start", "message": start})
            elif event is not None:
                for name, data in blocks.add(reply.add(event)):
                    yield anthropic.sse(name, data)
    except Exception as e:  # the engine failed on this request, or is stopping
        yield anthropic.sse("error", anthropic.error_body(failure(e)))
        return
    finally:  # also when the client went away and the response was cancelled
        jobs[0].cancelled.set()
    for name, data in blocks.finish():
        yield anthropic.sse(name, data)
    matched = reply.stops.matched
    stop = anthropic.stop_reason(reply.finish_reason, matched)
    delta = anthropic.message_delta(stop, matched, reply.completion_tokens)
    yield anthropic.sse("message_delta", delta)
    yield anthropic.sse("message_stop", {"type": "message_stop"})


def error_response(http: HTTPRequest, error: APIError) -> JSONResponse:
    """`error` in OpenAI's shape; a POST refused before its body was read closes the connection,
    which the unread body would otherwise garble."""
    unread = http.method == "POST" and not getattr(http.state, "body_read", False)
    headers = {"Connection": "close"} if unread else None
    anthropic_route = http.url.path.startswith(MESSAGES_ROUTE)
    body = anthropic.error_body(error) if anthropic_route else error.body()
    return JSONResponse(body, status_code=error.status, headers=headers)


async def api_error(http: HTTPRequest, e: Exception) -> JSONResponse:
    assert isinstance(e, APIError)
    return error_response(http, e)


async def http_error(http: HTTPRequest, e: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
    assert isinstance(e, HTTPException)
    what = "No such endpoint" if e.status_code == 404 else e.detail
    code = "not_found" if e.status_code == 404 else None
    return error_response(
        http, APIError(e.status_code, f"{what}: {http.method} {http.url.path}", code=code)
    )


def build_app(service: Service) -> FastAPI:
    """The app: /health open to all, the OpenAI routes behind the API key."""
    app = FastAPI(title=OWNER, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
    )
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.get("/health")(health)
    api = APIRouter(dependencies=[Depends(authorize)])
    api.get("/v1/models")(models)
    api.post("/v1/chat/completions")(chat_completions)
    api.post("/v1/completions")(completions)
    api.post(MESSAGES_ROUTE)(messages)
    api.post(MESSAGES_ROUTE + "/count_tokens")(count_tokens)
    app.include_router(api)
    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which on a signal also tells the engine to end the running jobs (their
    clients get a last chunk or an error) so that their requests end before it does."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.stopping()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, for SIGHUP too (a closed terminal), which uvicorn leaves to the handler
        before it: every signal the commands take as Ctrl-C ends the server as gracefully."""
        with super().capture_signals(), handling(self.handle_exit):
            yield


class Server:
    """`service`'s app served by uvicorn on `address`; port 0 takes a free one, which
    `server_address` tells once bound (at construction, so a port in use fails here)."""

    def __init__(self, address: tuple[str, int], service: Service) -> None:
        self.service = service
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._socket = socket.create_server(address, family=family, backlog=socket.SOMAXCONN)
        self.server_address: tuple[str, int] = self._socket.getsockname()[:2]
        config = uvicorn.Config(
            build_app(service),
            log_config=None,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
        self._server = _Uvicorn(config, service.engine)
        self._serving = threading.Event()
        self._served = threading.Event()

    def serve_forever(self) -> None:
        """Serve until `shutdown` or a signal (which is raised again once serving has ended)."""
        self._serving.set()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._served.set()

    def shutdown(self) -> None:
        """End `serve_forever` (running on another thread) and wait until it has."""
        self._server.should_exit = True
        if self._serving.is_set():
            self._served.wait()

    def server_close(self) -> None:
        """Release the listening socket."""
        self._socket.close()
