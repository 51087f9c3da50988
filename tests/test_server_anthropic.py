"""Anthropic's Messages API (`POST /v1/messages`) through the official `anthropic` client, against
the server as a process on a tiny random model, one request at a time and batching."""

from __future__ import annotations

import json

import pytest
from helpers import serve, server_command

anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

API_KEY = "anthropic-test-key"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Tokyo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 120


@pytest.fixture(scope="module", params=["queue", "batch"])
def client(request, roomy_release, tmp_path_factory):
    """An `anthropic` client of a server one request at a time, and of one batching."""
    flags = ["--api-key", API_KEY, "--decode-concurrency", "8" if request.param == "batch" else "1"]
    log = tmp_path_factory.mktemp(f"anthropic-{request.param}") / "server.log"
    for url in serve(server_command(roomy_release, *flags), log):
        yield anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0)


def test_system_multi_turn_thinking_budget_and_usage(client):
    reply = client.messages.create(
        model="default_model",
        system="You are terse.",
        messages=[
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        max_tokens=30,
        thinking={"type": "enabled", "budget_tokens": 8},
        extra_body={"temperature": 0.0},
    )
    assert reply.type == "message" and reply.role == "assistant"
    kinds = [block.type for block in reply.content]
    assert kinds[:2] == ["thinking", "text"] and reply.content[0].thinking
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.output_tokens <= 30 and reply.usage.input_tokens > 0


def test_the_stream_gives_the_reply_a_whole_reply_gives(client):
    body = dict(
        model="default_model",
        messages=ASK,
        max_tokens=24,
        thinking={"type": "enabled", "budget_tokens": 6},
        extra_body={"temperature": 0.0},
    )
    whole = client.messages.create(**body)
    events = []
    with client.messages.stream(**body) as stream:
        for event in stream:
            events.append(event.type)
        streamed = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "message_delta" in events and "content_block_stop" in events
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (
        whole.stop_reason,
        whole.usage.output_tokens,
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_and_its_result_the_next_turn(client, stream):
    body = dict(
        model="default_model",
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        thinking={"type": "disabled"},
        max_tokens=MAX_TOKENS,
        # Greedy: a sampled call on random weights could wander (whitespace the grammar allows)
        # past max_tokens, depending on what the server's generator drew before.
        extra_body={"temperature": 0.0},
    )
    if stream:
        with client.messages.stream(**body) as events:
            reply = events.get_final_message()
    else:
        reply = client.messages.create(**body)
    assert reply.stop_reason == "tool_use"
    calls = [b for b in reply.content if b.type == "tool_use"]
    assert calls and all(c.name == "get_weather" for c in calls)
    for call in calls:
        jsonschema.validate(call.input, WEATHER["input_schema"])
    results = [
        {"type": "tool_result", "tool_use_id": c.id, "content": json.dumps({"sky": "clear"})}
        for c in calls
    ]
    turn = [
        *ASK,
        {"role": "assistant", "content": [c.model_dump() for c in calls]},
        {"role": "user", "content": results},
    ]
    after = client.messages.create(
        model="default_model", messages=turn, tools=[WEATHER], max_tokens=8
    )
    assert after.usage.input_tokens + after.usage.cache_read_input_tokens > 0


def test_a_stop_sequence_is_reported(client):
    # The budget forces the thinking's closing tags, so "</think>" is sure to come.
    reply = client.messages.create(
        model="default_model",
        messages=ASK,
        max_tokens=30,
        thinking={"type": "enabled", "budget_tokens": 4},
        stop_sequences=["</think>"],
    )
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "</think>")


def test_errors_take_anthropic_s_shape_and_name_the_field(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="default_model", messages=ASK, max_tokens=0)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]
    bad_block = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\]"):
        client.messages.create(model="default_model", messages=bad_block, max_tokens=4)
    wrong_key = client.with_options(api_key="wrong")
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong_key.messages.create(model="default_model", messages=ASK, max_tokens=4)
    assert e.value.body["error"]["type"] == "authentication_error"


def test_count_tokens_gives_the_prompt_a_reply_bills(client):
    """`messages.count_tokens` (agent tools ask it before sending) counts the prompt the same
    conversation is billed for, tools and system included; a bad body names its field."""
    conversation = dict(
        model="default_model", system="You are terse.", messages=ASK, tools=[WEATHER]
    )
    counted = client.messages.count_tokens(**conversation).input_tokens
    reply = client.messages.create(**conversation, max_tokens=2, extra_body={"temperature": 0.0})
    assert counted == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    assert client.messages.count_tokens(model="default_model", messages=ASK).input_tokens < counted
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.count_tokens(model="default_model", messages=[])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "messages" in e.value.body["error"]["message"]
