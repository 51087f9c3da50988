"""The generation engines: one worker thread owns the model and does all MLX work (prompt cache
lookups, prefill, decoding, log-probabilities); HTTP threads only submit jobs and read their
events. A job whose client has gone is skipped, or stopped at its next token.

`Engine` runs the jobs one at a time, in the order they arrive. `BatchEngine` runs them together
through mlx-lm's `BatchGenerator` (continuous batching): a job joins the running batch as soon as
it arrives and leaves it when it ends.
"""

from __future__ import annotations

import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE, BatchGenerator

from ..generation.settings import GenerationSettings
from ..generation.stream import stream_generate
from ..tokenizer import HunYuanTokenizer
from .prompt_cache import PromptCache
from .protocol import TokenLogprob

# mlx-lm's server batches by default (32). Here batching is opt-in: the batched caches' attention
# mask takes the model off its compiled single-token decode step, and a lone sequence decoded
# slower in mlx-lm's batch generator than in `stream_generate` (CPU, tiny model, interleaved runs:
# 0.58-0.86x in 5 of 6, 1.05x in one); benchmarks/bench_server.py measures both on a GPU.
DEFAULT_DECODE_CONCURRENCY = 1
DEFAULT_PROMPT_CONCURRENCY = 8  # mlx-lm server's --prompt-concurrency
BATCH_DECODE_CONCURRENCY = 32  # mlx-lm server's --decode-concurrency


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

    def _open(self, job: Job) -> tuple[list[Any], int]:
        """The job's KV cache (from the prompt cache if it holds a prefix) and how many prompt
        tokens it holds; tells the job it started and seeds the PRNG as it asks."""
        cache, cached = self.prompt_cache.fetch(job.prompt)
        if cache is None:
            cache = job.settings.make_cache(self.model)
        job.events.put(Started(cached))
        if job.seed is not None:
            mx.random.seed(job.seed)
        return cache, cached

    def _run(self, job: Job) -> None:
        cache, cached = self._open(job)
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


@dataclass
class _Running:
    """A job in the batch: its streaming detokenizer and the tokens its sequence holds."""

    job: Job
    detokenizer: Any
    tokens: list[int]


class BatchEngine(Engine):
    """Runs jobs together with mlx-lm's `BatchGenerator`: up to `decode_concurrency` decode in
    one batch, up to `prompt_concurrency` prefill together (each in `prefill_step_size` chunks).

    The caches are mlx-lm's plain `KVCache`s (batched as `BatchKVCache`); a quantized or rotating
    KV cache needs `Engine`. Sampling settings, stop tokens and logits processors are per job, the
    PRNG is not: a seed makes a job repeatable only when it runs alone.
    """

    def __init__(
        self,
        *args: Any,
        decode_concurrency: int = BATCH_DECODE_CONCURRENCY,
        prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        **kwargs: Any,
    ) -> None:
        """`Engine`'s arguments, and how many jobs decode and prefill together."""
        super().__init__(*args, **kwargs)
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.prefill_step_size = prefill_step_size

    def _new_batch(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=self.decode_concurrency,
            prefill_batch_size=self.prompt_concurrency,
            prefill_step_size=self.prefill_step_size,
        )

    def _loop(self) -> None:
        if self._seed is not None:
            mx.random.seed(self._seed)
        batch = self._new_batch()
        running: dict[int, _Running] = {}
        stopping = False
        while running or not stopping:
            # Wait for work only when there is none; otherwise take what has arrived.
            wait = not running
            while not stopping:
                try:
                    job = self._jobs.get(block=wait)
                except queue.Empty:
                    break
                wait = False
                if job is None:
                    stopping = True
                else:
                    self._admit(batch, running, job)
            if not running:
                continue
            try:
                self._step(batch, running)
            except Exception as e:  # every job in the batch fails; the engine goes on
                for run in running.values():
                    run.job.events.put(e)
                running.clear()
                batch.close()
                batch = self._new_batch()
        batch.close()

    def _admit(self, batch: BatchGenerator, running: dict[int, _Running], job: Job) -> None:
        if job.cancelled.is_set():
            job.events.put(None)
            return
        try:
            cache, cached = self._open(job)
            settings = job.settings
            (uid,) = batch.insert(
                [job.prompt[cached:]],
                max_tokens=[settings.max_tokens if settings.max_tokens > 0 else sys.maxsize],
                caches=[cache],
                all_tokens=[job.prompt[:cached]],
                samplers=[settings.sampler()],
                logits_processors=[settings.logits_processors()],
            )
        except Exception as e:  # reported to the request's thread, the engine goes on
            job.events.put(e)
            return
        running[uid] = _Running(job, self.tokenizer.detokenizer, list(job.prompt))

    def _step(self, batch: BatchGenerator, running: dict[int, _Running]) -> None:
        gone = [uid for uid, run in running.items() if run.job.cancelled.is_set()]
        if gone:
            caches = batch.remove(gone, return_prompt_caches=True)
            for uid in gone:
                self._finish(running.pop(uid), caches[uid][0] if uid in caches else None)
        if not running:
            return
        _, responses = batch.next()
        for r in responses:
            run = running[r.uid]
            # As mlx-lm's stream_generate: the eos token ends the text without joining it.
            if r.finish_reason != "stop":
                run.detokenizer.add_token(r.token)
            if r.finish_reason is not None:
                run.detokenizer.finalize()
            run.tokens.append(r.token)
            logprob = None
            if run.job.top_logprobs is not None:
                logprob = token_logprob(r.logprobs, r.token, run.job.top_logprobs)
            text = run.detokenizer.last_segment
            run.job.events.put(Token(r.token, text, r.finish_reason, logprob))
            if r.finish_reason is not None:
                self._finish(running.pop(r.uid), r.prompt_cache)

    def _finish(self, run: _Running, cache: list[Any] | None) -> None:
        """End a job; keep its KV cache, which holds a prefix of its tokens (a sequence's last
        sampled token has not been run yet)."""
        if cache:
            self.prompt_cache.insert(run.tokens[: cache[0].offset], cache)
        run.job.events.put(None)
