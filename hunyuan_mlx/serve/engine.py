"""The generation engine: one worker thread owns the model and runs requests one at a time, in
the order they arrive (a first-come, first-served queue).

All MLX work (prompt cache lookups, prefill, decoding, log-probabilities) happens on that thread;
HTTP threads only submit jobs and read their events. A job whose client has gone is skipped, or
stopped at its next token.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from hunyuan_mlx.cli import GenerationSettings
from hunyuan_mlx.generate import stream_generate
from hunyuan_mlx.tokenizer import HunYuanTokenizer

from .prompt_cache import PromptCache
from .protocol import TokenLogprob


@dataclass(frozen=True)
class Started:
    """The job left the queue: how many prompt tokens came from the prompt cache."""

    cached_tokens: int


@dataclass(frozen=True)
class Token:
    """One generated token: its text (whole characters only), and why generation ended, if it
    did ("stop": an eos token, whose text is empty; "length": max_tokens)."""

    token: int
    text: str
    finish_reason: str | None
    logprob: TokenLogprob | None


@dataclass
class Job:
    """One request's work; its events are `Started`, then `Token`s, then None (or an exception)."""

    prompt: list[int]
    settings: GenerationSettings
    seed: int | None = None
    top_logprobs: int | None = None  # None: no log-probabilities
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Runs jobs on one thread that owns `model`, reusing KV caches through `prompt_cache`."""

    def __init__(
        self,
        model: Any,
        tokenizer: HunYuanTokenizer,
        prompt_cache: PromptCache,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_cache = prompt_cache
        self._seed = seed
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="hunyuan-mlx-engine", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then end the worker thread."""
        self._jobs.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue `job`; its events follow on `job.events`."""
        self._jobs.put(job)

    def _loop(self) -> None:
        if self._seed is not None:
            mx.random.seed(self._seed)
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                job.events.put(None)
                continue
            try:
                self._run(job)
            except Exception as e:  # reported to the request's thread, the engine goes on
                job.events.put(e)
            else:
                job.events.put(None)

    def _run(self, job: Job) -> None:
        cache, cached = self.prompt_cache.fetch(job.prompt)
        if cache is None:
            cache = job.settings.make_cache(self.model)
        job.events.put(Started(cached))
        if job.seed is not None:
            mx.random.seed(job.seed)
        tokens = list(job.prompt)
        for response in stream_generate(
            self.model, self.tokenizer, job.prompt[cached:], job.settings, prompt_cache=cache
        ):
            tokens.append(response.token)
            logprob = None
            if job.top_logprobs is not None:
                logprob = token_logprob(response.logprobs, response.token, job.top_logprobs)
            job.events.put(Token(response.token, response.text, response.finish_reason, logprob))
            if job.cancelled.is_set():
                break
        # mlx-lm has run every token it yields through the model, so the cache holds `tokens`.
        self.prompt_cache.insert(tokens, cache)


def token_logprob(logprobs: mx.array, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` and the `top` most likely tokens, best first."""
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = mx.argpartition(-logprobs, top - 1)[:top]
        values = logprobs[ids]
        order = mx.argsort(-values)
        alternatives = tuple(zip(ids[order].tolist(), values[order].tolist()))
    return TokenLogprob(token, logprobs[token].item(), alternatives)
