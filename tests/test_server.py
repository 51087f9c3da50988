"""`python -m hunyuan_mlx.server` as a real process on a free localhost port, on a tiny random
model with the release's tokenizer, driven by the `openai` client and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import serve, serve_process, server_command

from hunyuan_mlx.cli.server import build_parser, queue_reason
from hunyuan_mlx.generation.settings import GenerationSettings
from hunyuan_mlx.serve.app import Service

openai = pytest.importorskip("openai")

API_KEY = "test-key"
MAX_REQUEST_BYTES = 100_000
GREEDY = {"temperature": 0.0, "max_tokens": 12}


def start_server(tiny_release, log: Path, *flags: str):
    """(base URL, model id) of a server process, until the generator is closed."""
    limits = ["--api-key", API_KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    for url in serve(server_command(tiny_release, *limits, *flags), log):
        yield url, str(tiny_release)


@pytest.fixture(scope="module")
def server(tiny_release, tmp_path_factory):
    """A server as it starts by default (continuous batching)."""
    yield from start_server(tiny_release, tmp_path_factory.mktemp("server") / "server.log")


@pytest.fixture(scope="module")
def queue_server(tiny_release, tmp_path_factory):
    """A server serving one request at a time."""
    log = tmp_path_factory.mktemp("queue") / "server.log"
    yield from start_server(tiny_release, log, "--decode-concurrency", "1")


@pytest.fixture(scope="module")
def rotating_server(tiny_release, tmp_path_factory):
    """A server batching rotating KV caches (--max-kv-size), shorter than prompt and reply."""
    log = tmp_path_factory.mktemp("rotating") / "server.log"
    yield from start_server(tiny_release, log, "--max-kv-size", "24")


@pytest.fixture(scope="module")
def quantized_server(tiny_release, tmp_path_factory):
    """A server batching KV caches quantized from each sequence's first token."""
    log = tmp_path_factory.mktemp("quantized") / "server.log"
    flags = ["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0"]
    yield from start_server(tiny_release, log, *flags)
    assert "one request at a time" not in log.read_text()


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def post(url: str, path: str, body: bytes | dict, key: str | None = API_KEY):
    """(status, JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(client, model: str, text: str, **kwargs):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **{**GREEDY, **kwargs}
    )


def streamed(client, model: str, messages: list, **kwargs) -> tuple[str, object, str]:
    """(content, usage, finish_reason) of a streamed chat request."""
    content, finish, usage = "", None, None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **{**GREEDY, **kwargs},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return content, usage, finish


def test_health_and_models(server, client):
    url, model = server
    with urllib.request.urlopen(url + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [model]


def test_streamed_and_plain_replies_agree_and_the_cache_is_reported(server, client):
    _, model = server
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    plain = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    content, usage, finish = streamed(client, model, messages)
    assert plain.choices[0].message.content and content == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason == "length"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
        plain.usage.total_tokens,
    )
    assert plain.usage.completion_tokens == GREEDY["max_tokens"]
    # The same prompt again: all of it but the last token (which generation starts from) cached.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_the_next_turn_reuses_the_conversation(server, client):
    _, model = server
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    first = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Another one."},
    ]
    second = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens


def test_text_completions_stream_and_not(server):
    url, _ = server
    body = {"prompt": "Once upon a time", **GREEDY, "logprobs": 2}
    status, plain = post(url, "/v1/completions", body)
    assert status == 200
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    # Greedy: each chosen token is the most likely one (temperature 0, no penalty).
    for token, lp, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
    ):
        assert lp == pytest.approx(max(top.values())) and top[token] == lp
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    text = ""
    with urllib.request.urlopen(request) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        text += json.loads(event)["choices"][0]["text"]
    assert text == choice["text"]


@pytest.mark.parametrize(
    "kind", ["queue_server", "server", "rotating_server", "quantized_server"]
)
def test_eight_concurrent_clients_each_get_their_own_reply(request, kind):
    url, model = request.getfixturevalue(kind)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: chat(client, model, q), questions))
    alone = [chat(client, model, q) for q in questions]
    for a, b in zip(together, alone):
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.choices[0].finish_reason == "length"
        assert a.usage.completion_tokens == GREEDY["max_tokens"]
    assert len({r.choices[0].message.content for r in alone}) > 1  # not one reply for all


BAD_REQUESTS = [
    # (body, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 2.5}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_p": 2}, 400, "min_p"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0},
        400,
        "repetition_penalty",
    ),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    # The tiny model's context is 256 tokens: the prompt and max_tokens must fit in it.
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**8}, 400, "max_tokens"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 255},
        400,
        "max_completion_tokens",
    ),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
    (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True},
        },
        400,
        "stream_options",
    ),
    (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template_kwargs": {"enable_thinking": "no"},
        },
        400,
        "chat_template_kwargs.enable_thinking",
    ),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(
    server, client, body, status, param
):
    url, model = server
    got, error = post(url, "/v1/chat/completions", body)
    assert got == status
    assert error["error"]["param"] == param and error["error"]["message"]
    assert chat(client, model, "Still there?").choices[0].message.content


BAD_COMPLETIONS = [
    ({"max_tokens": 2}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "echo": True}, "echo"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_bad_completion_requests_name_the_field(server, body, param):
    url, _ = server
    status, error = post(url, "/v1/completions", body)
    assert (status, error["error"]["param"]) == (400, param)
    assert post(url, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})[0] == 200


def test_a_body_over_the_limit_is_refused(server, client):
    url, model = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    # Only the headers are sent: the server answers without reading a body that large.
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {API_KEY}")
    conn.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "body_too_large"
    conn.close()
    assert chat(client, model, "Still there?").choices[0].message.content


def test_the_api_key_is_required(server, client):
    url, model = server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong-key"):
        status, error = post(url, "/v1/chat/completions", body, key=key)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
    request = urllib.request.Request(url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 401
    assert post(url, "/v1/chat/completions", body)[0] == 200


def test_a_refused_request_leaves_the_client_able_to_go_on(server):
    """Refused before its body is read (401, unknown endpoint) or after (400): the client's
    next request, on the same connection if the server keeps it, gets its own answer."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    refusals = [
        ("/v1/chat/completions", good, {}, 401),
        ("/v1/nowhere", good, {"Authorization": f"Bearer {API_KEY}"}, 404),
        ("/v1/chat/completions", "{bad", {"Authorization": f"Bearer {API_KEY}"}, 400),
    ]
    for path, body, headers, status in refusals:
        conn = http.client.HTTPConnection(host, int(port))
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        assert response.status == status
        response.read()
        if response.will_close:
            conn.close()
            conn = http.client.HTTPConnection(host, int(port))
        conn.request("POST", "/v1/chat/completions", good, {"Authorization": f"Bearer {API_KEY}"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["object"] == "chat.completion"
        conn.close()


def test_a_refused_body_that_comes_late_still_gets_its_401(server):
    """A client that sends its body after its headers (as some do) gets the 401 and can go on
    on the same connection: refused unread, the server closed the connection under the late
    body, whose arrival reset it, and the anthropic client saw a connection error."""
    url, _ = server
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        for _ in range(2):
            conn.sendall(head.encode())
            time.sleep(0.3)  # the server answers here if it does not wait for the body
            conn.sendall(body.encode())
            time.sleep(0.3)
            reply = conn.recv(65536).decode()
            assert reply.startswith("HTTP/1.1 401") and "invalid_api_key" in reply


def test_a_model_without_a_chat_template_refuses_chat_by_name_and_completes(
    tiny_release, tmp_path
):
    """A checkpoint without tokenizer_config.json: chat is a 400 naming `messages` and what to
    do instead (it was a plain-text 500 and a traceback in the log); completions still work."""
    model = tmp_path / "model"
    shutil.copytree(tiny_release, model)
    (model / "tokenizer_config.json").unlink()
    for url, _ in start_server(model, tmp_path / "server.log"):
        messages = [{"role": "user", "content": "hi"}]
        status, error = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        assert status == 400 and error["error"]["param"] == "messages"
        assert "no chat template" in error["error"]["message"]
        assert "/v1/completions" in error["error"]["message"]
        status, reply = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200 and reply["object"] == "text_completion"


def test_a_seed_makes_sampling_repeat(server, client):
    _, model = server
    sampled = {"temperature": 1.0, "max_tokens": 12}
    runs = [chat(client, model, "Pick words.", seed=s, **sampled) for s in (7, 7, 8)]
    texts = [r.choices[0].message.content for r in runs]
    assert texts[0] == texts[1] != texts[2]
    # In a batch with other sampled requests, a seeded one still repeats: its key is its own.
    with ThreadPoolExecutor(4) as pool:
        crowd = [pool.submit(chat, client, model, f"Other {i}.", **sampled) for i in range(3)]
        seeded = chat(client, model, "Pick words.", seed=7, **sampled)
        [c.result() for c in crowd]
    assert seeded.choices[0].message.content == texts[0]


def test_chat_template_args_are_checked_at_startup(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--chat-template-args", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err
    args = parser.parse_args(["--model", "m", "--chat-template-args", '{"enable_thinking": false}'])
    assert args.chat_template_args == {"enable_thinking": False}
    with pytest.raises(ValueError, match="cannot set tools"):
        Service("m", None, None, None, GenerationSettings(), template_args={"tools": []})


@pytest.mark.parametrize("port", ["-5", "70000"])
def test_bad_port_is_refused_before_loading(port):
    from hunyuan_mlx.cli.server import build_service

    args = build_parser().parse_args(["--model", "/no/such/model", "--port", port])
    with pytest.raises(ValueError, match=f"--port must be in 0..65535, got {port}"):
        build_service(args)


def test_n_choices_differ_when_sampled_and_agree_when_greedy(server, client):
    _, model = server
    greedy = chat(client, model, "Name three fruits.", n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    texts = {c.message.content for c in greedy.choices}
    assert len(texts) == 1 and texts.pop() == chat(client, model, "Name three fruits.").choices[
        0
    ].message.content
    assert greedy.usage.completion_tokens == 3 * GREEDY["max_tokens"]
    sampled = {"temperature": 1.0, "seed": 5, "n": 3}
    runs = [chat(client, model, "Pick words.", **sampled) for _ in range(2)]
    first, second = ([c.message.content for c in r.choices] for r in runs)
    assert len(set(first)) == 3 and first == second  # each choice repeats with the seed
    content = [""] * 3
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Pick words."}],
        stream=True,
        **{**GREEDY, **sampled},
    ):
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
    assert content == first


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_request_ends_it_and_the_server_cleanly(tiny_release, tmp_path, signum):
    """Ctrl-C, SIGTERM or SIGHUP (a closed terminal) while a reply streams: the client gets an
    error event and [DONE], the process exits with 128 + the signal's number, without an abort
    or a traceback."""
    log = tmp_path / "server.log"
    for process, url in serve_process(server_command(tiny_release), log):
        body = {
            "messages": [{"role": "user", "content": "Write at length."}],
            "max_tokens": 200,
            "temperature": 0.0,
            "stream": True,
        }
        request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode())
        with urllib.request.urlopen(request) as response:
            events = [response.readline()]  # the first chunk: generation is under way
            process.send_signal(signum)
            events += response.read().splitlines()
        events = [e.decode()[6:] for e in events if e.strip()]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "server_stopping"
        assert process.wait(timeout=60) == 128 + signum
        text = log.read_text()
        assert "Aborted" not in text and "terminate called" not in text
        assert "Traceback" not in text


def test_quantized_kv_batches_only_from_the_first_token():
    """A batch cannot hold some sequences quantized and others not: --kv-bits batches with
    --quantized-kv-start 0, and otherwise says why it serves one request at a time."""
    assert queue_reason(32, GenerationSettings(kv_bits=4, quantized_kv_start=0)) is None
    reason = queue_reason(32, GenerationSettings(kv_bits=4))
    assert "--quantized-kv-start 5000" in reason and "--quantized-kv-start 0" in reason
    assert queue_reason(1, GenerationSettings()) == "--decode-concurrency 1"
