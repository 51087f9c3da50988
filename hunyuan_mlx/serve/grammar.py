"""Structured outputs: the answer decoded under a grammar (JSON, a JSON schema, strict tool calls),
as a per-request mlx-lm logits processor.

The engine is llguidance, picked by measurement over the release's 128,167-token vocabulary
(this 2-core CPU, shared, three runs; one schema of a string, an integer and a string array;
`benchmarks/bench_grammar.py`):

| engine        | tokenizer (once) | grammar (per request) | mask per token | mask + apply in MLX |
|---------------|------------------|-----------------------|----------------|---------------------|
| llguidance    | 360-1060 ms      | 0.8-6.8 ms            | 0.06-0.08 ms   | 0.32-0.46 ms        |
| xgrammar      | 64-166 ms        | 16-56 ms              | 0.04 ms        | 0.34-0.41 ms        |
| outlines-core | 206-443 ms       | 166-510 ms            | 0.81-0.83 ms   | 1.0-5.2 ms          |

xgrammar's mask is quicker by 0.02-0.04 ms a token, but its per-request compile costs what
hundreds of tokens of that save (and it pulls in torch and transformers). llguidance also takes
a Lark grammar, which is how the thinking stays outside the grammar: the model thinks freely up
to its first `</think>` (a lazy lexeme), then the grammar forces the answer tags around the JSON,
then an eos token. The thinking's tokens pay the mask too (all allowed but special tokens).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import llguidance
import llguidance.numpy
import mlx.core as mx

from ..tokenizer import HunYuanTokenizer
from .parser import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, TOOLS_CLOSE, TOOLS_OPEN
from .protocol import Request, invalid
from .reasoning import force_token

log = logging.getLogger(__name__)

BITS = 32  # llguidance's bitmask: one bit a token in int32 words
# Special tokens' bytes start with 0xFF so that no text can spell them (llguidance's convention).
SPECIAL_PREFIX = b"\xff"
NL = "\n"  # the template's line break around the answer


def lark_string(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text)


def lark_regex(text: str) -> str:
    """`text`, literally, inside a Lark /regex/."""
    return re.escape(text).replace("\\\n", "\\n").replace("/", "\\/")


ANSWER_END = lark_string(NL + ANSWER_CLOSE)
# JSON as `json.dumps` writes it: whitespace only after separators, so that a model cannot pad
# the answer with whitespace for ever.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark `%json` item of `schema`, laid out as `JSON_LAYOUT`."""
    return f"%json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}"


def answer_grammar(body: str, thinking: bool) -> str:
    """A Lark grammar of the model's output: the thinking (when the prompt leaves it open) up to
    its first `</think>`, free; then the answer as the chat template writes it, whose text after
    the opening tag is the rule `body` of the Lark rules `body` (closing tag included)."""
    lines = [f"start: {'think ' if thinking else ''}answer"]
    if thinking:
        lines += [
            f"think: {lark_string(THINK_OPEN)} thought",
            # Lazy: the thought ends at the first `</think>`, whatever it holds before that.
            f"thought[lazy]: /(?s:.*){lark_regex(THINK_CLOSE)}/",
        ]
    lines += [f'answer: "\\n"? {lark_string(ANSWER_OPEN + NL)} body', body]
    return "\n".join(lines) + "\n"


def json_body(schema: dict[str, Any] | None) -> str:
    """The answer as one JSON value under `schema` (None: any JSON object)."""
    return f"body: {lark_json({'type': 'object'} if schema is None else schema)} {ANSWER_END}"


def tools_body(tools: list[dict[str, Any]], choice: str) -> str | None:
    """The answer in tool mode, or None when nothing constrains it. `choice` is "auto"
    (constrained when a tool is `strict`: a tool block, or a reply that is not one), "required"
    (a tool block) or a tool's name (a block calling that tool). In a tool block each call names
    one of the tools and its arguments follow that tool's parameters schema."""
    if choice == "auto" and not any(t["function"].get("strict") for t in tools):
        return None
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t["function"]["name"] == choice]
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": tool["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    block = f"{lark_string(TOOLS_OPEN)} {lark_json(schema)} {lark_string(TOOLS_CLOSE)}"
    if choice != "auto":
        return f"body: {block} {ANSWER_END}"
    # A plain reply runs to the answer's closing tag and is anything but a tool block.
    end = lark_regex(NL + ANSWER_CLOSE)
    return (
        f"body: {block} {ANSWER_END} | reply\n"
        f"reply[lazy]: /(?s:.*){end}/ & ~/{lark_regex(TOOLS_OPEN)}(?s:.*)/"
    )


class _Vocabulary:
    """What llguidance asks of a tokenizer: the tokens' bytes, the specials and `encode`."""

    def __init__(self, tokenizer: HunYuanTokenizer) -> None:
        specials = set(tokenizer.special_tokens.values())
        self.eos_token_id = tokenizer.eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(specials)
        self.tokens = [
            SPECIAL_PREFIX + raw if i in specials else raw
            for i, raw in enumerate(tokenizer.token_bytes)
        ]
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class Grammars:
    """Compiles grammars for one tokenizer; llguidance's view of the vocabulary is built on the
    first structured request (about 0.4 s), not at startup."""

    def __init__(self, tokenizer: HunYuanTokenizer) -> None:
        self.tokenizer = tokenizer
        self._lltokenizer: llguidance.LLTokenizer | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            wrapper = llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer))
            self._lltokenizer = llguidance.LLTokenizer(
                wrapper, n_vocab=self.tokenizer.vocab_size, eos_token=self.tokenizer.eos_token_ids
            )
        return self._lltokenizer

    def check(self, grammar: str) -> None:
        """Refuse a grammar llguidance cannot compile (a bad schema), with its message."""
        error = llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_lark(grammar), self.lltokenizer
        )
        if error and not error.startswith("WARNING"):
            raise ValueError(error)

    def processor(self, grammar: str) -> GrammarProcessor:
        """A fresh logits processor for one generation under `grammar` (checked first)."""
        self.check(grammar)
        matcher = llguidance.LLMatcher(
            self.lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        return GrammarProcessor(matcher, self.tokenizer.vocab_size, self.tokenizer.eos_token_ids[0])


class GrammarProcessor:
    """An mlx-lm logits processor `(tokens, logits) -> logits` that leaves only the tokens the
    grammar allows next. Each call after the first feeds the matcher the token sampled since."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token: int) -> None:
        self.matcher = matcher
        self.eos_token = eos_token
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self._started = False
        self._shifts = mx.arange(BITS, dtype=mx.int32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            self.matcher.consume_token(tokens[-1].item())
        self._started = True
        if self.matcher.is_error():
            # Only a token forced past the grammar gets here; the reply ends rather than go on
            # unchecked (raising would fail every request of the batch).
            log.warning("grammar matcher failed, ending the reply: %s", self.matcher.get_error())
            return force_token(logits, self.eos_token)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._bitmask)
        words = mx.array(self._bitmask)
        allowed = ((words[..., None] >> self._shifts) & 1).reshape(1, -1)
        return mx.where(allowed[:, : logits.shape[-1]].astype(mx.bool_), logits, -mx.inf)


def constraints(
    request: Request, template_kwargs: dict[str, Any], grammars: Grammars
) -> dict[str, Any]:
    """The `Job` fields of a chat request's grammar (checked: a schema llguidance refuses is a
    400 naming the field) and thinking budget. Both apply only where the prompt, rendered with
    `template_kwargs`, leaves the thinking open: the grammar then takes it in, free."""
    thinking = template_kwargs.get("enable_thinking", True) is not False
    body, param = None, "response_format"
    if request.structured == "json":
        body = json_body(request.json_schema)
    elif request.structured == "tools" and request.tools is not None:
        body, param = tools_body(request.tools, request.tool_choice), "tools"
    grammar = None if body is None else answer_grammar(body, thinking)
    if grammar is not None:
        try:
            grammars.check(grammar)
        except ValueError as e:
            raise invalid(param, f"The {param} schema cannot be used: {e}") from None
    return {"grammar": grammar, "thinking_budget": request.thinking_budget if thinking else None}
