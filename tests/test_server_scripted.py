"""The server's reasoning and tool-call parsing, prompt cache and disconnects, end to end: a
scripted model writes fixed outputs through the real tokenizer and mlx-lm's generation loop, and
the server (engine and HTTP app, in this process) is driven with the `openai` client."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import KVCache

from hunyuan_mlx.generation.settings import GenerationSettings
from hunyuan_mlx.serve import app
from hunyuan_mlx.serve.app import Server, Service
from hunyuan_mlx.serve.engine import BatchEngine, Engine
from hunyuan_mlx.serve.prompt_cache import PromptCache
from hunyuan_mlx.tokenizer import HunYuanTokenizer

openai = pytest.importorskip("openai")

MODEL_ID = "scripted"
PROMPT_END = "<|extra_0|>"  # the chat template ends every user or tool turn with it
NO_THINK = "<think>\n\n</think>\n"  # what enable_thinking=False appends to the prompt
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
NOW_TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}


class ScriptedModel(nn.Module):
    """An mlx-lm protocol model (`model(inputs, cache=...) -> logits`) whose greedy output after
    any prompt is `script` (token ids), then eos.

    Its KV cache stores the token ids themselves, so the model knows the whole context even when
    the server's prompt cache supplies most of it; the reply starts after the context's last
    `<|extra_0|>` (and the no-thinking block, when the prompt has one). `processed` counts the
    tokens run through the model: what prefill and decoding cost; `widest`, the largest batch.
    """

    def __init__(self, tokenizer: HunYuanTokenizer, delay: float = 0.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.layers = [nn.Identity()]
        self.vocab_size = tokenizer.vocab_size
        self.prompt_end = tokenizer.special_tokens[PROMPT_END]
        self.no_think = tokenizer.encode(NO_THINK)
        self.eos = tokenizer.eos_token_ids[0]
        self.delay = delay
        self.script: list[int] = []
        self.processed = 0
        self.widest = 0  # the largest batch seen

    def make_cache(self) -> list[KVCache]:
        return [KVCache()]

    def __call__(self, inputs: mx.array, cache: list[KVCache], input_embeddings=None) -> mx.array:
        ids = inputs.astype(mx.float32)[:, None, :, None]
        context, _ = cache[0].update_and_fetch(ids, ids)
        self.processed += inputs.size
        self.widest = max(self.widest, inputs.shape[0])
        time.sleep(self.delay)
        # A batch's rows are left-padded (with id 0): the padding comes before any prompt end.
        tokens = [self.next_token([int(t) for t in row]) for row in context[:, 0, :, 0].tolist()]
        return mx.where(mx.arange(self.vocab_size) == mx.array(tokens)[:, None], 0.0, -1e9)[:, None]

    def next_token(self, history: list[int]) -> int:
        """The script's token after `history` (the context so far)."""
        # A prefill chunk may not reach the prompt's end yet: its logits are not used.
        ends = [i + 1 for i, t in enumerate(history) if t == self.prompt_end] or [len(history)]
        start = ends[-1]
        if history[start : start + len(self.no_think)] == self.no_think:
            start += len(self.no_think)
        n = len(history) - start
        return self.script[n] if n < len(self.script) else self.eos


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> HunYuanTokenizer:
    return HunYuanTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module", params=[Engine, BatchEngine], ids=["queue", "batch"])
def served(tokenizer, request):
    """(openai client, scripted model, server address, engine) of an in-process server, with
    each engine."""
    model = ScriptedModel(tokenizer)
    engine = request.param(model, tokenizer, PromptCache())
    engine.start()
    service = Service(MODEL_ID, model, tokenizer, engine, GenerationSettings(max_tokens=200))
    server = Server(("127.0.0.1", 0), service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)
    yield client, model, (host, port), engine
    server.shutdown()
    server.server_close()
    engine.stop()


def script(model: ScriptedModel, tokenizer: HunYuanTokenizer, *pieces: str) -> None:
    """Make the model write `pieces`, each tokenized on its own (so tags split across tokens
    the way the pieces say)."""
    model.script = [t for piece in pieces for t in tokenizer.encode(piece)]


def ask(client, messages, stream: bool, **kwargs):
    """(reasoning, content, [(name, arguments dict)], finish_reason, usage) of one request,
    gathered from the stream's deltas when streaming."""
    if not stream:
        r = client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)
        m = r.choices[0].message
        calls = [
            (c.function.name, json.loads(c.function.arguments), c.id) for c in m.tool_calls or []
        ]
        reasoning = getattr(m, "reasoning_content", None) or ""
        return reasoning, m.content or "", calls, r.choices[0].finish_reason, r.usage
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    reasoning = content = ""
    calls, finish = [], None
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for c in delta.tool_calls or []:
            assert c.index == len(calls) and c.type == "function"
            calls.append((c.function.name, json.loads(c.function.arguments), c.id))
        finish = chunk.choices[0].finish_reason or finish
    assert chunks[-1].choices == []
    return reasoning, content, calls, finish, chunks[-1].usage


USER = [{"role": "user", "content": "北京天气怎么样？"}]
SCRIPTED = [
    # (pieces the model writes, tools, enable_thinking, reasoning, content, calls, finish)
    (
        ["<think>\n想一想🌧️\n</think>\n", "<answer>\n晴，25°C。\n</answer>"],
        None,
        None,
        "想一想🌧️",
        "晴，25°C。",
        [],
        "stop",
    ),
    (["Hello<answer> world</answer>"], None, None, "", "Hello world", [], "stop"),
    (["<think>hmm</answer>\n<answer>ok</answer>"], None, None, "hmm", "ok", [], "stop"),
    (["<think>x</think>\nanswer>\nFine.\n</answer>"], None, None, "x", "Fine.", [], "stop"),
    (["<answer>\nshort\n</answer>"], None, False, "", "short", [], "stop"),
    (["助手：你好！"], [WEATHER_TOOL], None, "", "你好！", [], "stop"),
    (
        [
            "<think>需要查天气</think>\n<answer>\n<tool_",
            'calls>[{"name": "get_weather", "arguments": {"city": "北京"}}]</tool_calls>',
            "\n</answer>",
        ],
        [WEATHER_TOOL],
        None,
        "需要查天气",
        "",
        [("get_weather", {"city": "北京"})],
        "tool_calls",
    ),
    (
        [
            '<tool_calls>[{"name": "now", "arguments": {}}, ',
            '{"name": "get_weather", "arguments": {"city": "上海"}}]</tool_calls>',
        ],
        [NOW_TOOL, WEATHER_TOOL],
        None,
        "",
        "",
        [("now", {}), ("get_weather", {"city": "上海"})],
        "tool_calls",
    ),
    (
        ['<tool_calls>[{"name": "now", "arguments": {}}]</tool_calls>\nDone.'],
        [NOW_TOOL],
        None,
        "",
        "Done.",
        [("now", {})],
        "tool_calls",
    ),
    (
        ['<tool_calls>[{"name": "now", "arguments": {]</tool_calls>'],
        [NOW_TOOL],
        None,
        "",
        '<tool_calls>[{"name": "now", "arguments": {]</tool_calls>',
        [],
        "stop",
    ),
]


@pytest.mark.parametrize("pieces,tools,thinking,reasoning,content,calls,finish", SCRIPTED)
def test_scripted_outputs_parse_the_same_streamed_and_not(
    served, tokenizer, pieces, tools, thinking, reasoning, content, calls, finish
):
    client, model, _, _ = served
    script(model, tokenizer, *pieces)
    kwargs = {"tools": tools} if tools else {}
    if thinking is not None:
        kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": thinking}}
    results = [ask(client, USER, stream, **kwargs) for stream in (False, True)]
    for got_reasoning, got_content, got_calls, got_finish, got_usage in results:
        assert (got_reasoning, got_content, got_finish) == (reasoning, content, finish)
        assert [(name, args) for name, args, _ in got_calls] == calls
        assert len({i for _, _, i in got_calls}) == len(calls)
        assert got_usage.completion_tokens == len(model.script) + 1  # the eos included
    assert results[0][4].prompt_tokens == results[1][4].prompt_tokens


def test_tool_choice_none_leaves_tool_mode(served, tokenizer):
    client, model, _, _ = served
    script(model, tokenizer, "助手：你好！")
    reply = ask(client, USER, False, tools=[WEATHER_TOOL], tool_choice="none")
    assert reply[1] == "助手：你好！"


def test_a_tool_conversation_prefills_only_its_new_tokens(served, tokenizer, monkeypatch):
    client, model, _, _ = served
    # The template writes the time (to the minute) into the prompt: keep it still meanwhile.
    fixed = datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(app, "datetime", SimpleNamespace(now=lambda: fixed))
    call = '[{"name": "get_weather", "arguments": {"city": "北京"}}]'
    script(model, tokenizer, f"<tool_calls>{call}</tool_calls>")
    messages = [{"role": "system", "content": "简洁回答。"}, *USER]
    first = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=[WEATHER_TOOL])
    calls = first.choices[0].message.tool_calls
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"weather": "晴"}'},
    ]
    script(model, tokenizer, "助手：北京晴。")
    before = model.processed
    second = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "北京晴。"
    usage = second.usage
    # The template re-renders the call exactly as the model wrote it: the whole first exchange
    # is cached (up to the tool role's tokens), and only the rest is prefilled.
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    new_prompt_tokens = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
    # Every token mlx-lm yields, the eos included, has been run through the model.
    assert model.processed - before == new_prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(served, tokenizer, stream):
    client, model, address, _ = served
    script(model, tokenizer, "word " * 150)
    model.delay = 0.02
    try:
        body = json.dumps(
            {"messages": [{"role": "user", "content": "go"}], "stream": stream, "max_tokens": 150}
        ).encode()
        sock = socket.create_connection(address)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has started
        else:  # no reply before the end: wait until generation is under way
            started = model.processed
            deadline = time.monotonic() + 60
            while model.processed <= started + 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        before = model.processed
        sock.close()
        # Polled, not a fixed wait (a loaded machine runs the steps late): until no step runs
        # for a second, 50 steps' time; a generation that went on would reach 150 tokens.
        stopped_at, deadline = -1, time.monotonic() + 60
        while model.processed != stopped_at and time.monotonic() < deadline:
            stopped_at = model.processed
            time.sleep(1.0)
        assert model.processed == stopped_at  # nothing more runs for the gone client
        assert stopped_at - before < 100
    finally:
        model.delay = 0.0
    script(model, tokenizer, "still here")
    assert ask(client, USER, False)[1] == "still here"


def test_stop_strings_and_logprobs(served, tokenizer):
    client, model, _, _ = served
    script(model, tokenizer, "<answer>one two three</answer>")
    for stream in (False, True):
        reply = ask(client, USER, stream, stop=["three"])
        assert reply[1:4] == ("one two", [], "stop")
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert [e.token for e in entries] == [tokenizer.decode([t]) for t in model.script]
    assert all(e.logprob == 0.0 and e.top_logprobs[0].token == e.token for e in entries)
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_concurrent_requests_share_batches_only_with_the_batch_engine(served, tokenizer):
    client, model, _, _ = served
    script(model, tokenizer, "<answer>", "together " * 20, "</answer>")
    model.widest = 0
    model.delay = 0.01
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: ask(client, USER, True), range(4)))
    finally:
        model.delay = 0.0
    assert all(r[1] == ("together " * 20).strip() and r[3] == "stop" for r in replies)
    batched = isinstance(served[3], BatchEngine)
    assert (model.widest > 1) == batched
