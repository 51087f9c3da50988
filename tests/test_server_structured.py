"""Structured outputs and the thinking budget as logits processors: random logits (a model that
knows nothing) decoded under them still give output that parses, validates and keeps the chat
template's tags, with the release's tokenizer."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest
from helpers import (
    serve,
    server_command,
)

from hunyuan_mlx.serve.grammar import Grammars, answer_grammar, json_body, tools_body
from hunyuan_mlx.serve.parser import OutputParser
from hunyuan_mlx.serve.reasoning import (
    THINKING_CLOSING,
    THINKING_OPENING,
    ThinkingBudget,
    force_token,
    thinking_switch,
)
from hunyuan_mlx.tokenizer import HunYuanTokenizer

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "ok", "count"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Tokyo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> HunYuanTokenizer:
    return HunYuanTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer)


def sample(tokenizer, processors, seed: int, max_tokens: int = MAX_TOKENS) -> tuple[str, bool]:
    """(text, whether an eos token ended it) of sampling random logits under `processors`, as
    mlx-lm calls them: with the tokens so far, the last being the one sampled since."""
    mx.random.seed(seed)
    tokens = [tokenizer.eos_token_ids[0]]  # stands for the prompt
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = mx.random.normal((1, tokenizer.vocab_size))
        for processor in processors:
            logits = processor(mx.array(tokens), logits)
        token = mx.random.categorical(logits).item()
        if token in tokenizer.eos_token_ids:
            return tokenizer.decode(generated), True
        tokens.append(token)
        generated.append(token)
    return tokenizer.decode(generated), False


def parse(text: str, tools: bool = False):
    parser = OutputParser(tools=tools)
    delta = parser.feed(text)
    delta.extend(parser.finish())
    return delta


@pytest.mark.parametrize("seed", range(3))
def test_random_logits_under_a_schema_give_valid_json_in_the_answer_tags(tokenizer, grammars, seed):
    grammar = answer_grammar(json_body(SCHEMA), thinking=False)
    text, ended = sample(tokenizer, [grammars.processor(grammar)], seed)
    assert ended, text
    assert text.lstrip("\n").startswith("<answer>\n") and text.endswith("\n</answer>")
    reply = parse(text)
    jsonschema.validate(json.loads(reply.content), SCHEMA)


def test_any_json_object(tokenizer, grammars):
    """Random keys may run past max_tokens (as they could under OpenAI's json_object); whatever
    ends, ends as an object."""
    grammar = answer_grammar(json_body(None), False)
    ended = 0
    for seed in range(4):
        text, done = sample(tokenizer, [grammars.processor(grammar)], seed)
        assert text.lstrip("\n").startswith("<answer>\n{")
        if done:
            ended += 1
            assert isinstance(json.loads(parse(text).content), dict)
    assert ended


def test_the_thinking_is_free_and_the_budget_closes_it_before_the_grammar(tokenizer, grammars):
    budget = 20
    processors = [
        grammars.processor(answer_grammar(json_body(SCHEMA), thinking=True)),
        ThinkingBudget(budget, tokenizer),
    ]
    text, ended = sample(tokenizer, processors, 1)
    assert ended, text
    reply = parse(text)
    assert text.startswith("<think>\n") and reply.reasoning
    thought = tokenizer.encode(text[: text.index("</think>")])
    assert len(thought) <= budget + 1  # the closing's first token may merge with the last
    jsonschema.validate(json.loads(reply.content), SCHEMA)


def test_a_thinking_budget_alone_ends_the_thinking_and_opens_the_answer(tokenizer):
    text, _ = sample(tokenizer, [ThinkingBudget(10, tokenizer)], 2, max_tokens=30)
    reply = parse(text)
    assert text.startswith("<think>\n") and "\n</think>\n<answer>\n" in text
    assert reply.reasoning and reply.content


def test_a_budget_waits_for_the_character_a_token_left_open(tokenizer, grammars):
    """A token can end inside a character (byte tokens): the budget, spent there, lets the
    character's bytes come before it forces the closing, which a grammar then still matches."""
    single_bytes = {b: i for i, b in enumerate(tokenizer.token_bytes) if len(b) == 1}
    character = [single_bytes[bytes([b])] for b in "交".encode()]  # three bytes
    opening = tokenizer.encode(THINKING_OPENING)
    budget = ThinkingBudget(len(opening) + 1, tokenizer)  # spent after the first byte
    grammar = grammars.processor(answer_grammar(json_body(SCHEMA), thinking=True))
    logits = mx.zeros((1, tokenizer.vocab_size))
    tokens = [0]  # the prompt's last
    # The model picks the character's bytes (the second and third past the budget); the budget
    # forces the opening before them and the closing after them.
    free = range(len(opening) + 1, len(opening) + len(character) + 1)
    for planned in [*opening, *character, *tokenizer.encode(THINKING_CLOSING)]:
        grammar(mx.array(tokens), logits)
        out = budget(mx.array(tokens), logits)
        if len(tokens) in free:
            assert out is logits, tokens
        else:
            assert mx.argmax(out).item() == planned, tokens
        tokens.append(planned)
    grammar(mx.array(tokens), logits)
    assert not grammar.matcher.is_error(), grammar.matcher.get_error()


def test_a_budget_leaves_a_thinking_that_closed_alone(tokenizer):
    budget = ThinkingBudget(3, tokenizer)
    closing = tokenizer.encode("<think>\nhm\n</think>\n<answer>\n")
    logits = mx.zeros((1, tokenizer.vocab_size))
    for i in range(len(closing)):
        budget(mx.array([0, *closing[:i]]), logits)
    assert budget(mx.array([0, *closing]), logits) is logits


@pytest.mark.parametrize("choice", ["required", "get_weather", "auto"])
def test_strict_tool_calls_follow_the_tools_schema(tokenizer, grammars, choice):
    grammar = answer_grammar(tools_body([WEATHER], choice), thinking=False)
    for seed in range(3):
        text, ended = sample(tokenizer, [grammars.processor(grammar)], seed)
        reply = parse(text, tools=True)
        if choice != "auto" or "<tool_calls>" in text:
            assert ended, text
            assert reply.tool_calls and not reply.content
            for call in reply.tool_calls:
                assert call.name == "get_weather"
                jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
        else:  # a plain reply: never a tool block, valid or not
            assert not reply.tool_calls and "<tool_calls>" not in reply.content


def test_tools_without_strict_are_not_constrained():
    assert tools_body([{"type": "function", "function": {"name": "f"}}], "auto") is None


def test_a_bad_schema_is_refused_with_llguidance_s_message(grammars):
    with pytest.raises(ValueError, match="minimum"):
        grammars.check(answer_grammar(json_body({"type": "integer", "minimum": "x"}), False))


def test_force_token_leaves_one_choice():
    logits = force_token(mx.zeros((1, 8)), 5)
    assert mx.argmax(logits).item() == 5 and mx.isinf(logits).sum().item() == 7


@pytest.mark.parametrize(
    "text, switch",
    [("/no_think hi", False), ("/think\nhi", True), ("hi /no_think", None), ("/thinking", None)],
)
def test_the_soft_switch_reads_the_last_user_message(text, switch):
    messages = [{"role": "user", "content": "/think first"}, {"role": "user", "content": text}]
    assert thinking_switch(messages) is switch


# Through the server as a process, with the `openai` client, on a tiny random model: only the
# processors can make its replies valid.
openai = pytest.importorskip("openai")
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
ASK = [{"role": "user", "content": "Pick a colour."}]


@pytest.fixture(scope="module", params=["queue", "batch"])
def served(request, roomy_release, tmp_path_factory):
    """(base URL, model id) of a server one request at a time, and one batching."""
    flags = ["--decode-concurrency", "8" if request.param == "batch" else "1"]
    log = tmp_path_factory.mktemp(f"structured-{request.param}") / "server.log"
    for url in serve(server_command(roomy_release, *flags), log):
        yield url, str(roomy_release)


def ask(served, stream: bool = False, **kwargs) -> tuple[str, str, str, str | None]:
    """(reasoning_content, reasoning, content, finish_reason) of a chat reply."""
    url, model = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    body = {"model": model, "messages": ASK, "max_tokens": MAX_TOKENS, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**body).choices[0]
        extra = choice.message.model_extra
        return (
            extra.get("reasoning_content", ""),
            extra.get("reasoning", ""),
            choice.message.content or "",
            choice.finish_reason,
        )
    fields = {"reasoning_content": "", "reasoning": "", "content": ""}
    finish = None
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            delta = {**choice.delta.model_extra, "content": choice.delta.content}
            for name in fields:
                fields[name] += delta.get(name) or ""
            finish = choice.finish_reason or finish
    return fields["reasoning_content"], fields["reasoning"], fields["content"], finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_random_model_answers_json_valid_under_the_schema(served, stream):
    _, _, content, finish = ask(
        served, stream, response_format=JSON_SCHEMA_FORMAT, extra_body=NO_THINKING
    )
    assert finish == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_budget_ends_the_thinking_then_the_json_comes(served, stream):
    reasoning_content, reasoning, content, finish = ask(
        served, stream, response_format=JSON_SCHEMA_FORMAT, extra_body={"max_thinking_tokens": 8}
    )
    assert reasoning_content and reasoning == reasoning_content and finish == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_both_reasoning_fields_and_the_answer_after_the_budget(served, stream):
    reasoning_content, reasoning, content, _ = ask(
        served, stream, max_tokens=30, extra_body={"max_thinking_tokens": 10}
    )
    assert reasoning_content and reasoning == reasoning_content and content


def test_the_soft_switch_and_enable_thinking_close_the_thinking(served):
    budget = {"max_thinking_tokens": 4}
    # With the thinking closed in the prompt, the budget has nothing to close: no reasoning.
    url, model = served
    for switch in [
        {"enable_thinking": False},
        {"chat_template_kwargs": {"enable_thinking": False}},
    ]:
        assert ask(served, max_tokens=12, extra_body={**budget, **switch})[0] == ""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    for text, thinks in [("/no_think Pick a colour.", False), ("/think Pick a colour.", True)]:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            max_tokens=12,
            extra_body=budget,
        )
        assert bool(reply.choices[0].message.model_extra.get("reasoning")) is thinks


def test_reasoning_effort_is_a_budget_and_a_bad_one_names_the_field(served):
    assert ask(served, max_tokens=4, reasoning_effort="low")[3] == "length"
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, max_tokens=4, extra_body={"reasoning_effort": "extreme"})
    assert e.value.body["param"] == "reasoning_effort"


def test_a_schema_llguidance_refuses_is_a_400_naming_response_format(served):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, response_format=bad)
    assert e.value.body["param"] == "response_format"


def test_a_required_tool_call_follows_the_tool_schema(served):
    url, model = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        extra_body=NO_THINKING,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_concurrent_structured_requests_all_validate(served):
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda i: ask(
                    served,
                    i % 2 == 1,
                    response_format=JSON_SCHEMA_FORMAT,
                    temperature=1.0,
                    seed=i,
                    extra_body=NO_THINKING,
                ),
                range(4),
            )
        )
    for _, _, content, _ in replies:
        jsonschema.validate(json.loads(content), SCHEMA)
