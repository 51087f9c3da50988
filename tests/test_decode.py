"""The whole model's decode graph (`models/decode.py`) gives the plain path's tokens and
log-probabilities (float32, 1e-4) through mlx-lm's generation loop, with every cache it supports,
and leaves the caches as their own updates would."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import pytest
from helpers import FAST_PATHS_CONFIG, greedy_steps
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    ConcatenateKVCache,
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
    trim_prompt_cache,
)

from hunyuan_mlx.models import FastPaths, HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM, decode
from hunyuan_mlx.models import fast_paths as fp
from hunyuan_mlx.models.quantization import apply_quantization

ATOL = 1e-4
PLAIN = FastPaths.off()
GRAPH = dataclasses.replace(PLAIN, decode_graph=True)
PROMPT = mx.array([(11 * i + 5) % 200 for i in range(13)])
STEPS = 30


@pytest.fixture
def small_buckets(monkeypatch):
    """Buffers grow 8 positions at a time: a generation crosses several buckets."""
    monkeypatch.setattr(decode, "DECODE_BUCKET", 8)


@pytest.fixture
def traces(monkeypatch):
    """Counts the traces of the compiled step (its Python runs only while tracing)."""
    count = []
    original = decode.step_function

    def counted(*args):
        step = original(*args)

        def traced(*inputs):
            count.append(True)
            return step(*inputs)

        return traced

    monkeypatch.setattr(decode, "step_function", counted)
    return count


def tiny_model(quantized: bool = True, rope_scaling: dict | None = None) -> HunYuanMoEV1ForCausalLM:
    mx.random.seed(0)
    config = dict(FAST_PATHS_CONFIG)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(**config))
    if quantized:
        apply_quantization(model, {"group_size": 32, "bits": 4})
    model.eval()
    mx.eval(model.parameters())
    return model


def generation(model, policy: FastPaths, cache=None, **kwargs) -> tuple[list[int], mx.array, list]:
    """Greedy tokens and log-probabilities of `STEPS` steps of mlx-lm's loop under `policy`."""
    with fp.using(model, policy):
        return greedy_steps(model, PROMPT, STEPS, cache, **kwargs)


def assert_same(fast, plain) -> None:
    assert fast[0] == plain[0]
    assert mx.abs(fast[1] - plain[1]).max().item() <= ATOL


def rotating_cache(model, max_size: int = 20) -> list[RotatingKVCache]:
    return [RotatingKVCache(max_size=max_size, keep=4) for _ in model.layers]


CACHES = {
    "kv": {},
    "quantized kv from the start": dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0),
    "quantized kv midway": dict(kv_bits=4, kv_group_size=32, quantized_kv_start=20),
}


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("name", CACHES)
def test_graph_decode_equals_plain(name, quantized, small_buckets, traces):
    model = tiny_model(quantized)
    fast = generation(model, GRAPH, **CACHES[name])
    assert traces  # the graph ran
    assert_same(fast, generation(model, PLAIN, **CACHES[name]))


@pytest.mark.parametrize("max_size", [20, 64])  # wraps around (keeping 4) / never fills
def test_graph_decode_with_a_rotating_cache_equals_plain(max_size, small_buckets, traces):
    model = tiny_model()
    fast = generation(model, GRAPH, rotating_cache(model, max_size))
    assert traces
    plain = generation(model, PLAIN, rotating_cache(model, max_size))
    assert_same(fast, plain)
    for a, b in zip(fast[2], plain[2]):
        assert (a.offset, a._idx) == (b.offset, b._idx)
        assert a.keys.shape[2] <= max_size


def test_caches_left_as_their_own_updates_leave_them(small_buckets):
    """After graph steps a cache holds the plain path's keys and values at the same offset:
    trimmed (as the server's prompt cache and chat sessions do) and continued by either path,
    it gives the same logits."""
    model = tiny_model()
    fast, plain = generation(model, GRAPH), generation(model, PLAIN)
    for a, b in zip(fast[2], plain[2]):
        assert a.offset == b.offset
        n = a.offset
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert mx.abs(x[..., :n, :] - y[..., :n, :]).max().item() <= ATOL
    ids = mx.array([[3, 1, 4, 1, 5]])
    outs = []
    for cache, policy in ((fast[2], GRAPH), (plain[2], PLAIN)):
        trim_prompt_cache(cache, 7)
        with fp.using(model, policy):
            steps = [model(ids, cache=cache)] + [model(ids[:, i : i + 1], cache=cache)
                                                 for i in range(5)]
        outs.append(mx.concatenate(steps, axis=1))
    assert mx.abs(outs[0] - outs[1]).max().item() <= ATOL


def test_traced_once_per_buffer_size(small_buckets, traces):
    """Shapes repeat within a bucket: the step retraces only when the buffers grow."""
    model = tiny_model()
    _, _, cache = generation(model, GRAPH)
    # The prompt's 12 positions fill mlx-lm's first 256-position buffer; it never grows here.
    assert cache[0].keys.shape[2] == KVCache.step
    assert len(traces) == 1
    traces.clear()
    long_prompt = mx.arange(KVCache.step - 3) % 200
    cache = make_prompt_cache(model)
    with fp.using(model, GRAPH):
        for _, _ in zip(generate_step(long_prompt, model, prompt_cache=cache), range(20)):
            pass
    # Full after 3 steps, then grown 8 positions at a time: one trace per size, 256 included
    # (giving the policy anew dropped the step compiled above).
    size = cache[0].keys.shape[2]
    assert size > KVCache.step and size - 8 < cache[0].offset <= size
    assert len(traces) == len(range(KVCache.step, size + 1, 8))


def test_new_weights_are_seen(traces):
    """The model's parameters are the compiled step's inputs: no stale weights."""
    model = tiny_model()
    generation(model, GRAPH)
    layer = model.layers[1]
    layer.mlp.shared_mlp.down_proj.scales = layer.mlp.shared_mlp.down_proj.scales * 2
    layer.self_attn.o_proj.scales = layer.self_attn.o_proj.scales * 0.5
    assert_same(generation(model, GRAPH), generation(model, PLAIN))


@pytest.mark.parametrize(
    "case",
    ["concatenate cache", "unequal caches", "length-dependent rope", "training", "embeddings"],
)
def test_calls_the_graph_cannot_take_run_the_plain_path(case, traces):
    rope = {"type": "dynamic", "factor": 2.0} if case == "length-dependent rope" else None
    model = tiny_model(rope_scaling=rope)
    if case == "training":
        model.train()
    cache = model.make_cache()
    if case == "concatenate cache":
        cache = [ConcatenateKVCache() for _ in model.layers]
    with fp.using(model, GRAPH):
        model(PROMPT[None, :-1], cache=cache)
        if case == "unequal caches":
            trim_prompt_cache(cache[:1], 1)
        if case == "embeddings":
            h = model.model.embed_tokens(PROMPT[None, -1:])
            got = model(None, cache=cache, input_embeddings=h)
        else:
            got = model(PROMPT[None, -1:], cache=cache)
    assert not traces
    assert got.shape == (1, 1, model.config.vocab_size)
