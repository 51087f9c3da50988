"""The generation engines: one worker thread owns the model and does all MLX work (prompt cache
lookups, prefill, decoding, log-probabilities); the HTTP routes only submit jobs and read their
events. A job whose client has gone is skipped, or stopped at its next token (under mlx.launch,
at the ranks' next check: `CANCEL_CHECK_TOKENS`).

`Engine` runs the jobs one at a time, in the order they arrive. `BatchEngine` runs them together
through mlx-lm's `BatchGenerator` (continuous batching): a job joins the running batch as soon as
it arrives and leaves it when it ends.

Under `mlx.launch` every rank holds a share of the model, so every rank must run every step:
rank 0's engine hands each job to the others (`Engine.follow`), which run it as rank 0 does and
drop its events; a batch's jobs join and leave it at the same step on every rank. Same jobs in
the same order, same seeds: the ranks' prompt caches and sampled tokens stay alike.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE, BatchGenerator, generation_stream
from mlx_lm.sample_utils import LogitsProcessor, Sampler, apply_min_p, apply_top_k, apply_top_p

from ..distributed import broadcast_json
from ..generation.settings import GenerationSettings
from ..generation.stream import stream_generate
from ..tokenizer import HunYuanTokenizer
from .batch_cache import BatchableQuantizedKVCache
from .grammar import Grammars
from .prompt_cache import PromptCache
from .protocol import TokenLogprob
from .reasoning import ThinkingBudget

log = logging.getLogger(__name__)

# Batching is on by default, as in mlx-lm's server: a lone sequence decodes as fast in mlx-lm's
# batch generator as in `stream_generate` (CPU, reduced shape, 64 tokens: 186.6 vs 184.4 tok/s),
# and more clients share each step. benchmarks/bench_server.py measures both.
DEFAULT_DECODE_CONCURRENCY = 32  # mlx-lm server's --decode-concurrency
DEFAULT_PROMPT_CONCURRENCY = 8  # mlx-lm server's --prompt-concurrency
# Under mlx.launch the ranks agree every this many tokens whether rank 0's job was cancelled, so
# all stop at the same step: each check waits for the step in flight (a collective on the
# host), which every token would make a decode-speed cost; a cancelled job runs on for at most
# this many tokens, unseen.
CANCEL_CHECK_TOKENS = 16
JOIN_POLL_SECONDS = 0.5  # how soon the main thread, waiting for the worker, acts on a signal
# How long a rank other than 0, signalled, goes on with rank 0's job so that rank 0 (signalled
# too, by mlx.launch or the terminal) can stop it and tell every rank to end; and how long rank 0
# waits to say it.
FOLLOW_GRACE_SECONDS = 10


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


class EngineClosed(Exception):
    """A job's last event when the server stops before the job has ended."""

    def __init__(self) -> None:
        super().__init__("The server is stopping; the request was ended")


@dataclass
class Job:
    """One request's work; its events are `Started`, then `Token`s, then None (or an exception:
    `EngineClosed` when the server stops first). `events` is anything with a thread-safe `put`."""

    prompt: list[int]
    settings: GenerationSettings
    seed: int | None = None
    top_logprobs: int | None = None  # None: no log-probabilities
    grammar: str | None = None  # a Lark grammar the output must follow (serve.grammar)
    thinking_budget: int | None = None  # tokens of thinking before its closing is forced
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
        group: mx.distributed.Group | None = None,
    ) -> None:
        """`group`: the ranks of `mlx.launch` that hold `model` between them (rank 0 serves)."""
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_cache = prompt_cache
        self.grammars = Grammars(tokenizer)
        self._seed = seed
        self.group = group if group is not None and group.size() > 1 else None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._closing = threading.Event()
        self._done = threading.Event()  # the worker's work has ended (its thread lives on)
        self._thread = threading.Thread(
            target=self._settled, args=(self._loop,), name="hunyuan-mlx-engine", daemon=True
        )

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then wait until the worker has ended its work."""
        self._jobs.put(None)
        self._done.wait()

    def stopping(self) -> None:
        """End the running and queued jobs at their next token, with `EngineClosed` (safe in a
        signal handler: it only sets a flag)."""
        self._closing.set()

    def close(self) -> None:
        """Cancel the running and queued jobs and end the worker thread, waiting for it (up to
        `FOLLOW_GRACE_SECONDS`: under mlx.launch a rank that died would keep it in a collective)
        so that the process never exits in the middle of its MLX work; under mlx.launch its
        last word ends the other ranks' `follow`."""
        self._closing.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            wait_for(self._done, FOLLOW_GRACE_SECONDS)

    def submit(self, job: Job) -> None:
        """Queue `job`; its events follow on `job.events`."""
        self._jobs.put(job)

    def _settled(self, work: Callable[[], None]) -> None:
        """Run `work` on the worker thread, then keep the thread for the rest of the process.

        It waits first for what `work` left in flight (mlx-lm evaluates the next step ahead,
        `async_eval`, on this thread's own stream). Then it parks rather than ends: an ending
        thread destroys MLX's per-thread compile cache, which takes the GIL, and if the main
        thread is by then finalizing the interpreter, that aborts the process ("terminate
        called without an active exception"; Python's join returns before a thread's C++
        thread-locals are destroyed)."""
        try:
            work()
        except Exception:
            log.exception("The engine stopped")
        finally:
            mx.synchronize(generation_stream)
            mx.synchronize()
            self._done.set()
        threading.Event().wait()  # for ever: the process ends with the thread parked

    def _loop(self) -> None:
        if self._seed is not None:
            mx.random.seed(self._seed)
        while (job := self._jobs.get()) is not None:
            if self._dropped(job):
                self._end(job)
                continue
            self._hand_out(job)
            try:
                self._run(job)
            except Exception as e:  # reported to the request's thread, the engine goes on
                job.events.put(e)
            else:
                self._end(job)
        self._hand_out(None)

    def _end(self, job: Job) -> None:
        """Tell `job`'s request that it has ended: with `EngineClosed` if the server stopped it."""
        stopped = self._closing.is_set() and not job.cancelled.is_set()
        job.events.put(EngineClosed() if stopped else None)

    def _hand_out(self, job: Job | None) -> None:
        """Under mlx.launch: give the other ranks `job` (None: the engine stops)."""
        if self.group is not None:
            self._agree(None if job is None else job_message(job))

    def _agree(self, value: Any) -> Any:
        """Rank 0's `value` on every rank, through collectives on the stream generation runs on:
        on another stream they could meet a generation step's in another order on each rank."""
        with mx.stream(generation_stream):
            return broadcast_json(self.group, value)

    def follow(self) -> None:
        """On a rank other than 0: run the jobs rank 0's engine hands out, until it stops.

        They run on the worker thread while this one waits, so that a signal still reaches
        this process: in a collective waiting for a rank 0 that died, the thread would wait
        for ever, and a signal handler runs on the main thread only between Python steps."""
        self._thread = threading.Thread(
            target=self._settled, args=(self._follow,), name="hunyuan-mlx-engine", daemon=True
        )
        self._thread.start()
        try:
            wait_for(self._done)
        except BaseException:  # a signal: rank 0, which got it too, is stopping the jobs
            self._done.wait(FOLLOW_GRACE_SECONDS)
            raise

    def _follow(self) -> None:
        if self._seed is not None:
            mx.random.seed(self._seed)
        while (message := self._agree(None)) is not None:
            try:
                self._run(job_from_message(message))
            except Exception:  # rank 0 met the same error and reports it
                pass

    def _open(self, job: Job) -> tuple[list[Any], int]:
        """The job's KV cache (from the prompt cache if it holds a prefix) and how many prompt
        tokens it holds; tells the job it started."""
        cache, cached = self.prompt_cache.fetch(job.prompt)
        if cache is None:
            cache = self._fresh_cache(job.settings)
        job.events.put(Started(cached))
        return cache, cached

    def _fresh_cache(self, settings: GenerationSettings) -> list[Any]:
        """An empty KV cache for a job (mlx-lm's generation loop quantizes it at
        `quantized_kv_start`)."""
        return settings.make_cache(self.model)

    def _constraints(self, job: Job) -> list[LogitsProcessor]:
        """The job's grammar and thinking budget as logits processors (fresh: they hold the
        job's state); the budget last, so that what it forces wins."""
        processors: list[LogitsProcessor] = []
        if job.grammar is not None:
            processors.append(self.grammars.processor(job.grammar))
        if job.thinking_budget is not None:
            processors.append(ThinkingBudget(job.thinking_budget, self.tokenizer))
        return processors

    def _run(self, job: Job) -> None:
        cache, cached = self._open(job)
        tokens = list(job.prompt)
        responses = stream_generate(
            self.model,
            self.tokenizer,
            job.prompt[cached:],
            job.settings,
            prompt_cache=cache,
            sampler=seeded_sampler(job.settings, job.seed),
            logits_processors=self._constraints(job),
        )
        for n, response in enumerate(responses, 1):
            tokens.append(response.token)
            logprob = None
            if job.top_logprobs is not None:
                logprob = token_logprob(response.logprobs, response.token, job.top_logprobs)
            job.events.put(Token(response.token, response.text, response.finish_reason, logprob))
            if self._stops(job, n):
                break
        # mlx-lm has run every token it yields through the model, so the cache holds `tokens`.
        self.prompt_cache.insert(tokens, cache)

    def _stops(self, job: Job, n: int) -> bool:
        """Whether to stop `job` after its `n`-th token: once cancelled (or the engine closing);
        under mlx.launch, at the ranks' next check of rank 0's word (`CANCEL_CHECK_TOKENS`)."""
        if self.group is None:
            return self._dropped(job)
        return n % CANCEL_CHECK_TOKENS == 0 and self._agree(self._dropped(job))

    def _dropped(self, job: Job) -> bool:
        """Whether `job` is to end now: its client has gone, or the engine is closing."""
        return job.cancelled.is_set() or self._closing.is_set()


def job_message(job: Job) -> dict[str, Any]:
    """What the other ranks of mlx.launch need to run `job` as rank 0 does (JSON)."""
    return {
        "prompt": job.prompt,
        "settings": dataclasses.asdict(job.settings),
        "seed": job.seed,
        "top_logprobs": job.top_logprobs,
        "grammar": job.grammar,
        "thinking_budget": job.thinking_budget,
    }


def job_from_message(message: dict[str, Any]) -> Job:
    """Rank 0's job on another rank, whose events nobody reads."""
    return Job(**{**message, "settings": GenerationSettings(**message["settings"])})


def seeded_sampler(settings: GenerationSettings, seed: int | None) -> Sampler:
    """`settings.sampler()`, but with a `seed` drawing from a PRNG key of its own rather than the
    process's, so that a job's samples repeat whatever else shares the batch: mlx-lm's filters
    in mlx-lm's order, then the categorical draw with the job's next key."""
    if seed is None or settings.temp == 0:
        return settings.sampler()
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, draw = mx.random.split(key)
        if 0 < settings.top_p < 1:
            logprobs = apply_top_p(logprobs, settings.top_p)
        if settings.min_p != 0:
            logprobs = apply_min_p(logprobs, settings.min_p)
        if settings.top_k > 0:
            logprobs = apply_top_k(logprobs, settings.top_k)
        return mx.random.categorical(logprobs * (1 / settings.temp), key=draw)

    return sample


def wait_for(done: threading.Event, timeout: float | None = None) -> None:
    """Wait until `done` is set (for at most `timeout` seconds) in short waits, between which
    the main thread acts on signals."""
    end = None if timeout is None else time.monotonic() + timeout
    while not done.wait(JOIN_POLL_SECONDS) and (end is None or time.monotonic() < end):
        pass


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

    The caches are mlx-lm's `KVCache`s or, with `max_kv_size`, `RotatingKVCache`s (batched as
    `BatchKVCache` / `BatchRotatingKVCache`), or with `kv_bits` quantized from a sequence's first
    token (`batch_cache.py`: one batch cannot hold some sequences quantized and others not, so
    a `quantized_kv_start` other than 0 needs `Engine`). Sampling settings, stop tokens and
    logits processors are per job, and so is the PRNG of a job with a seed (`seeded_sampler`): it
    repeats whatever else runs.
    """

    def __init__(
        self,
        *args: Any,
        decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY,
        prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        **kwargs: Any,
    ) -> None:
        """`Engine`'s arguments, and how many jobs decode and prefill together."""
        super().__init__(*args, **kwargs)
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.prefill_step_size = prefill_step_size

    def _fresh_cache(self, settings: GenerationSettings) -> list[Any]:
        """An empty KV cache for a job, quantized from its first token under `kv_bits`."""
        if settings.kv_bits is None:
            return settings.make_cache(self.model)
        return [
            BatchableQuantizedKVCache(settings.kv_group_size, settings.kv_bits)
            for _ in self.model.layers
        ]

    def _new_batch(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=self.decode_concurrency,
            prefill_batch_size=self.prompt_concurrency,
            prefill_step_size=self.prefill_step_size,
        )

    def _loop(self) -> None:
        self._batches(lead=True)

    def _follow(self) -> None:
        self._batches(lead=False)

    def _batches(self, lead: bool) -> None:
        """The batch's loop. Rank 0 (`lead`) takes the jobs that arrive and drops those whose
        clients went. Under mlx.launch every rank runs this loop, and rank 0 tells the others
        which jobs join and leave at the ranks' checks: whenever the batch is empty, and every
        `CANCEL_CHECK_TOKENS` steps (a check waits for the step in flight), so that every rank
        admits and drops the same jobs at the same step and the batches stay alike."""
        if self._seed is not None:
            mx.random.seed(self._seed)
        batch = self._new_batch()
        running: dict[int, _Running] = {}
        pending: list[Job] = []
        stopping = False
        steps = 0
        while True:
            if lead and not stopping:
                stopping = self._arrivals(pending, wait=not running and not pending)
            if self.group is None or not running or steps % CANCEL_CHECK_TOKENS == 0:
                joining, gone, stopping = self._check(lead, pending, running, stopping)
                self._remove(batch, running, gone)
                for job in joining:
                    self._admit(batch, running, job)
            if not running:
                if stopping:
                    break
                continue
            try:
                self._step(batch, running)
            except Exception as e:  # every job in the batch fails; the engine goes on
                for run in running.values():
                    run.job.events.put(e)
                running.clear()
                batch.close()
                batch = self._new_batch()
            steps += 1
        batch.close()

    def _arrivals(self, pending: list[Job], wait: bool) -> bool:
        """Move the jobs that have arrived to `pending`, waiting for one if `wait`; whether the
        engine was told to stop."""
        while True:
            try:
                job = self._jobs.get(block=wait)
            except queue.Empty:
                return False
            if job is None:
                return True
            pending.append(job)
            wait = False

    def _check(
        self, lead: bool, pending: list[Job], running: dict[int, _Running], stopping: bool
    ) -> tuple[list[Job], list[int], bool]:
        """The jobs that join the batch now, the uids that leave it and whether the engine
        stops: rank 0's word, on every rank."""
        if lead:
            joining = []
            for job in pending:  # one look at each: a client may go between two
                if self._dropped(job):
                    self._end(job)
                else:
                    joining.append(job)
            pending.clear()
            gone = [uid for uid, run in running.items() if self._dropped(run.job)]
            if self.group is not None:
                self._agree({"jobs": [job_message(j) for j in joining], "gone": gone,
                             "stop": stopping})
            return joining, gone, stopping
        word = self._agree(None)
        return [job_from_message(m) for m in word["jobs"]], word["gone"], word["stop"]

    def _admit(self, batch: BatchGenerator, running: dict[int, _Running], job: Job) -> None:
        try:
            cache, cached = self._open(job)
            settings = job.settings
            (uid,) = batch.insert(
                [job.prompt[cached:]],
                max_tokens=[settings.max_tokens if settings.max_tokens > 0 else sys.maxsize],
                caches=[cache],
                all_tokens=[job.prompt[:cached]],
                samplers=[seeded_sampler(settings, job.seed)],
                logits_processors=[[*settings.logits_processors(), *self._constraints(job)]],
            )
        except Exception as e:  # reported to the request's thread, the engine goes on
            job.events.put(e)
            return
        running[uid] = _Running(job, self.tokenizer.detokenizer, list(job.prompt))

    def _remove(self, batch: BatchGenerator, running: dict[int, _Running], gone: list[int]) -> None:
        """End the jobs `gone` before their last token, keeping their KV caches."""
        if gone:
            caches = batch.remove(gone, return_prompt_caches=True)
            for uid in gone:
                self._finish(running.pop(uid), caches[uid][0] if uid in caches else None)

    def _step(self, batch: BatchGenerator, running: dict[int, _Running]) -> None:
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
        self._end(run.job)
