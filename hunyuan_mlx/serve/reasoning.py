"""Reasoning as clients ask for it: the thinking switch (`enable_thinking`, `/think`, `/no_think`)
and a thinking budget that closes the thinking with the chat template's tags, so that the answer
still comes."""

from __future__ import annotations

import codecs
from typing import Any

import mlx.core as mx

from ..tokenizer import HunYuanTokenizer
from .parser import ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

# OpenAI's `reasoning_effort` as thinking budgets in tokens (docs/server.md states them).
REASONING_EFFORT_BUDGETS = {"low": 512, "medium": 2048, "high": 8192}
# Hunyuan's soft switches, at the start of the user's last message (the model card's usage).
THINK_SWITCHES = {"/think": True, "/no_think": False}
THINKING_OPENING = THINK_OPEN + "\n"  # how the model opens its thinking
THINK_CLOSE_BYTES = THINK_CLOSE.encode()
THINKING_CLOSING = f"\n{THINK_CLOSE}\n{ANSWER_OPEN}\n"  # and closes it, opening the answer
# Tokens a budget waits, at most, for a character it would cut (a token may end inside one: a
# UTF-8 character's bytes after its first).
MAX_WAIT_FOR_CHARACTER = 3


def thinking_switch(messages: list[dict[str, Any]]) -> bool | None:
    """True for `/think`, False for `/no_think` at the start of the last user message, else
    None."""
    for message in reversed(messages):
        if message["role"] == "user":
            text = (message.get("content") or "").lstrip()
            for switch, on in THINK_SWITCHES.items():
                if text == switch or text.startswith((switch + " ", switch + "\n")):
                    return on
            return None
    return None


def template_variables(
    server: dict[str, Any], messages: list[dict[str, Any]], request: dict[str, Any]
) -> dict[str, Any]:
    """The chat template's variables: the server's, then a `/think` or `/no_think` switch in the
    last user message, then the request's own."""
    switch = thinking_switch(messages)
    soft = {} if switch is None else {"enable_thinking": switch}
    return {**server, **soft, **request}


def force_token(logits: mx.array, token: int) -> mx.array:
    """Logits that leave `token` the only choice (log-probability 0)."""
    ids = mx.arange(logits.shape[-1])
    return mx.where(ids == token, mx.zeros_like(logits), mx.array(-mx.inf, logits.dtype))


class ThinkingBudget:
    """An mlx-lm logits processor for a prompt that leaves the thinking open: forces the model's
    opening `<think>`, and once `budget` tokens are generated with the thinking still open, the
    closing `</think>` and the answer's opening tag. Each call after the first reads the token
    sampled since.

    A token may end inside a character; the closing then waits for the character's remaining
    bytes (up to `MAX_WAIT_FOR_CHARACTER` tokens): forced in the middle, it would leave invalid
    UTF-8, which a grammar (whose thought is text) cannot match, and the reply would end there."""

    def __init__(self, budget: int, tokenizer: HunYuanTokenizer) -> None:
        self.budget = budget
        self._token_bytes = tokenizer.token_bytes
        self._closing = tokenizer.encode(THINKING_CLOSING)
        self._forced = tokenizer.encode(THINKING_OPENING)  # tokens still to force, in order
        self._closed = False
        self._closing_forced = False
        self._generated = 0
        self._tail = b""  # the output's end: all of `</think>` but its last byte
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            self._add(tokens[-1].item())
        self._started = True
        if not (self._closed or self._closing_forced or self._forced) and self._closes_now():
            self._forced = list(self._closing)
            self._closing_forced = True
        if self._forced:
            return force_token(logits, self._forced.pop(0))
        return logits

    def _add(self, token: int) -> None:
        self._generated += 1
        if not self._closed:
            text = self._tail + self._token_bytes[token]
            self._closed = THINK_CLOSE_BYTES in text
            self._tail = text[1 - len(THINK_CLOSE_BYTES) :]

    def _closes_now(self) -> bool:
        """Whether the budget is spent and the output does not end inside a character (or has
        waited for it long enough)."""
        over = self._generated - self.budget
        if over < 0:
            return False
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(self._tail)
        mid_character = bool(decoder.getstate()[0])  # bytes held for a character's rest
        return not mid_character or over >= MAX_WAIT_FOR_CHARACTER
