"""Structured outputs and the thinking budget as logits processors: random logits (a model that
knows nothing) decoded under them still give output that parses, validates and keeps the chat
template's tags, with the release's tokenizer."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from hunyuan_mlx.serve.grammar import Grammars, answer_grammar, json_body, tools_body
from hunyuan_mlx.serve.parser import OutputParser
from hunyuan_mlx.serve.reasoning import ThinkingBudget, force_token, thinking_switch
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
def test_random_logits_under_a_schema_give_valid_json_in_the_answer_tags(
    tokenizer, grammars, seed
):
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


def test_a_budget_leaves_a_thinking_that_closed_alone(tokenizer):
    budget = ThinkingBudget(3, tokenizer)
    closing = tokenizer.encode("<think>\nhm\n</think>\n<answer>\n")
    logits = mx.zeros((1, tokenizer.vocab_size))
    for i, token in enumerate(closing):
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
