"""The batched quantized KV cache (`serve/batch_cache.py`): sequences decoded together through
mlx-lm's `BatchGenerator` get the tokens and log-probabilities (float32, 1e-4) each gets alone on
its own quantized cache, whoever joins or leaves the batch, and leave caches that go on alike."""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import FAST_PATHS_CONFIG, greedy_steps
from mlx_lm.generate import BatchGenerator

from hunyuan_mlx.models import FastPaths, HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
from hunyuan_mlx.serve.batch_cache import BatchableQuantizedKVCache, BatchQuantizedKVCache

ATOL = 1e-4
GROUP_SIZE, BITS = 32, 4
PROMPTS = [[(7 * i + 3 * j) % 200 for i in range(n)] for j, n in enumerate((5, 13, 9, 17))]
MAX_TOKENS = [12, 6, 12, 10]  # the second leaves the batch early
LATE = 3  # the last prompt joins after this many steps


@pytest.fixture(scope="module")
def model() -> HunYuanMoEV1ForCausalLM:
    mx.random.seed(0)
    model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(**FAST_PATHS_CONFIG), FastPaths.default())
    model.eval()
    mx.eval(model.parameters())
    return model


def cache(model) -> list[BatchableQuantizedKVCache]:
    return [BatchableQuantizedKVCache(GROUP_SIZE, BITS) for _ in model.layers]


def alone(model, prompt: list[int], steps: int) -> tuple[list[int], mx.array, list]:
    """Greedy tokens and log-probabilities of `prompt` decoded by itself, and its cache."""
    return greedy_steps(model, mx.array(prompt), steps, cache(model))


def dequantized(buffer, n: int) -> tuple[mx.array, mx.array]:
    """The first `n` positions of a quantized buffer, dequantized, and its scales."""
    data, scales, biases = (x[..., :n, :] for x in buffer)
    return mx.dequantize(data, scales, biases, GROUP_SIZE, BITS), scales


def test_sequences_decode_together_as_each_alone(model):
    batch = BatchGenerator(model, stop_tokens=[], completion_batch_size=8, prefill_batch_size=8)
    uids = batch.insert(PROMPTS[:-1], max_tokens=MAX_TOKENS[:-1],
                        caches=[cache(model) for _ in PROMPTS[:-1]])
    got: dict[int, tuple[list[int], list[mx.array]]] = {}
    ended = {}
    steps = 0
    while len(ended) < len(PROMPTS):
        if steps == LATE:
            uids += batch.insert([PROMPTS[-1]], max_tokens=MAX_TOKENS[-1:], caches=[cache(model)])
        _, responses = batch.next()
        for r in responses:
            tokens, logprobs = got.setdefault(r.uid, ([], []))
            tokens.append(r.token)
            logprobs.append(r.logprobs)
            if r.finish_reason is not None:
                ended[r.uid] = r.prompt_cache
        steps += 1
    batch.close()
    for uid, prompt, n in zip(uids, PROMPTS, MAX_TOKENS):
        tokens, logprobs, own = alone(model, prompt, n)
        assert got[uid][0] == tokens
        for a, b in zip(got[uid][1], logprobs):
            assert mx.abs(a - b).max().item() <= ATOL
        # The cache the sequence leaves holds its prompt and replies as its own cache holds
        # them: alike to within one quantization step (the batch's keys and values differ from
        # the lone sequence's by float rounding, which can move a value across a level).
        left = ended[uid]
        assert all(isinstance(c, BatchableQuantizedKVCache) for c in left)
        held = left[0].offset
        assert len(prompt) + n - 1 <= held <= own[0].offset
        for a, b in zip(left, own):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                x, y = (dequantized(t, held) for t in (x, y))
                step = x[1].max().item()
                assert mx.abs(x[0] - y[0]).max().item() <= step


def test_a_left_cache_goes_on_in_a_new_batch_as_alone(model):
    """The prompt cache's use: a sequence's cache taken out of one batch and merged into the next
    (beside a fresh sequence) continues as the same cache continued alone."""
    _, _, first = alone(model, PROMPTS[1], 4)
    follow_up = [3, 14, 15]
    batch = BatchGenerator(model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=4)
    (uid, _) = batch.insert(
        [follow_up, PROMPTS[0]], max_tokens=[5, 5], caches=[first, cache(model)]
    )
    got = []
    while len(got) < 5:
        _, responses = batch.next()
        got += [(r.token, r.logprobs) for r in responses if r.uid == uid]
    batch.close()
    _, _, again = alone(model, PROMPTS[1], 4)
    want, want_logprobs = greedy_steps(model, mx.array(follow_up), 5, again)[:2]
    assert [token for token, _ in got] == want
    for (_, lp), want_lp in zip(got, want_logprobs):
        assert mx.abs(lp - want_lp).max().item() <= ATOL


def test_caches_of_other_quantizations_do_not_batch():
    a, b = BatchableQuantizedKVCache(32, 4), BatchableQuantizedKVCache(32, 8)
    with pytest.raises(ValueError, match="group sizes or bits"):
        BatchQuantizedKVCache.merge([a, b])
