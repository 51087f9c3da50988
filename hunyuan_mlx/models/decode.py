"""Decode as one compiled graph per token: the whole model's single-token step in one `mx.compile`.

mlx-lm's caches return a slice of their buffer as long as the sequence, a new shape every token,
which `mx.compile` would retrace each time. Here each layer's preallocated buffer goes into the
compiled step whole: the new key and value are written with `mx.slice_update` at an array index,
the attention reads the whole buffer under a mask of the positions written so far, and RoPE takes
the position as an array. The shapes then repeat until a buffer grows (by `DECODE_BUCKET`
positions), and the step retraces only then.

The step runs the model's own `__call__` (norms, attention, router, experts, shared expert,
tensor mode's all_sums) on `BufferSlots`, stand-ins for the caches that write into the buffers;
the real caches (`KVCache`, `QuantizedKVCache`, `RotatingKVCache`, as mlx-lm's generation loop,
prompt-cache trimming and the server use them) get the new buffers and their bookkeeping after
the call, exactly as their own `update_and_fetch` leaves it. Another cache type, several unequal
caches, explicit positions or embeddings, pipeline mode or training take the plain path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

# Positions a buffer grows by when a decode step finds it full. Each new buffer size traces the
# step anew (tens of milliseconds at A13B shape), and the attention reads the whole buffer.
DECODE_BUCKET = 1024
CACHE_TYPES = (KVCache, QuantizedKVCache, RotatingKVCache)

Buffers = Any  # a layer's (keys, values) buffers; each a tuple (data, scales, biases) if quantized


class BufferSlots:
    """A layer's cache inside the compiled step: `update_and_fetch` writes the token's key and
    value into the whole buffers at index `write` and returns them. `offset` (RoPE's position)
    is an array; `bits` and `group_size` exist for a quantized cache (mlx-lm's attention asks)."""

    def __init__(
        self,
        buffers: Buffers,
        offset: mx.array,
        write: mx.array,
        quantization: tuple[int, int] | None,
    ):
        self.keys, self.values = buffers
        self.offset = offset
        self.write = write
        if quantization is not None:
            self.group_size, self.bits = quantization

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Buffers:
        if hasattr(self, "bits"):
            keys, values = (mx.quantize(t, self.group_size, self.bits) for t in (keys, values))
        self.keys, self.values = tree_map(self._written, (self.keys, self.values), (keys, values))
        return self.keys, self.values

    def _written(self, buffer: mx.array, update: mx.array) -> mx.array:
        return mx.slice_update(buffer, update, self.write, axes=(2,))


def quantization(cache: Any) -> tuple[int, int] | None:
    """(group size, bits) of a quantized cache, None for another."""
    return (cache.group_size, cache.bits) if type(cache) is QuantizedKVCache else None


def grown(buffer: Any, kept: int, size: int) -> Any:
    """`buffer` (arrays, tree) cut to its first `kept` positions and padded with zeros to `size`."""

    def grow(x: mx.array) -> mx.array:
        pad = mx.zeros((*x.shape[:2], size - kept, x.shape[3]), dtype=x.dtype)
        return mx.concatenate([x[..., :kept, :], pad], axis=2)

    return tree_map(grow, buffer)


def bucketed(positions: int, cap: int | None = None) -> int:
    """`positions` rounded up to a whole number of buckets, at most `cap`."""
    size = -(-positions // DECODE_BUCKET) * DECODE_BUCKET
    return size if cap is None else min(size, cap)


def reserve(cache: Any) -> tuple[int, int]:
    """Make room for one more token in `cache` as its `update_and_fetch` would (growing,
    trimming, rotating its buffers); returns the index the token is written at and how many
    leading buffer positions the attention reads after the write."""
    prev = cache.offset
    if type(cache) is RotatingKVCache:
        size = cache.keys.shape[2]
        if prev >= size and size < cache.max_size:
            size = bucketed(prev + 1, cache.max_size)
            cache.keys, cache.values = grown((cache.keys, cache.values), prev, size)
            cache._idx = prev
        trim = cache.keys.shape[2] - cache.max_size
        if trim > 0:
            cache.keys, cache.values = (cache._trim(trim, b) for b in (cache.keys, cache.values))
            cache._idx = cache.max_size
        if cache._idx == cache.max_size:
            cache._idx = cache.keep
        return cache._idx, min(prev + 1, cache.keys.shape[2])
    first = cache.keys[0] if type(cache) is QuantizedKVCache else cache.keys
    if prev + 1 > first.shape[2]:
        cache.keys, cache.values = grown((cache.keys, cache.values), prev, bucketed(prev + 1))
    return prev, prev + 1


def advance(cache: Any, buffers: Buffers) -> None:
    """Give `cache` the step's written buffers and count the token, as `update_and_fetch` does."""
    cache.keys, cache.values = buffers
    cache.offset += 1
    if type(cache) is RotatingKVCache:
        cache._idx += 1


def takes_decode_graph(
    model: nn.Module, inputs: mx.array | None, cache: list[Any] | None, **rest: Any
) -> bool:
    """Whether the `HunYuanMoEV1Model` call `model(inputs, cache, **rest)` can run as
    `decode_graph_step`: the policy takes it, one token of ids with nothing else given (no
    embeddings, mask, positions or hidden-state list), in eval mode, not pipelined, RoPE
    independent of the length, every layer's cache of one supported type, with the same length
    and already holding the prompt."""
    if (
        not model.fast_paths.decode_graph
        or any(v is not None for v in rest.values())
        or inputs is None
        or inputs.shape[1] != 1
        or not cache
        or model.training
        or model.pipeline_group is not None
        or model.layers[0].self_attn.rotary_emb.dynamic_factor is not None
    ):
        return False
    first = cache[0]
    kind = type(first)
    if kind not in CACHE_TYPES or first.keys is None:
        return False
    state = (first.offset, getattr(first, "_idx", None), quantization(first))
    return all(
        type(c) is kind
        and c.keys is not None
        and (c.offset, getattr(c, "_idx", None), quantization(c)) == state
        for c in cache
    )


def decode_graph_step(model: nn.Module, inputs: mx.array, cache: list[Any]) -> mx.array:
    """`model(inputs, cache)` for one token (see `takes_decode_graph`), as one compiled graph.

    The model's parameters are the compiled function's implicit inputs, so new weights (loading,
    adapters) are picked up and a changed structure traces anew; the functions are kept on the
    model under a leading underscore, which keeps them out of its parameters.
    """
    position = cache[0].offset
    slots = [reserve(c) for c in cache]
    write, valid = slots[0]
    if any(s != slots[0] for s in slots):  # caches alike before need not stay alike: never seen
        raise RuntimeError(f"decode caches disagree after reserving a slot: {set(slots)}")
    if model._decode_graphs is None:
        model._decode_graphs = DecodeGraphs()
    h, buffers = model._decode_graphs.step(model, quantization(cache[0]))(
        # One dtype, one trace: mlx-lm's loop feeds the prompt's last id, then sampled uint32s.
        inputs if inputs.dtype == mx.uint32 else inputs.astype(mx.uint32),
        mx.array(position, dtype=mx.int32),
        mx.array(write, dtype=mx.int32),
        mx.array(valid, dtype=mx.int32),
        [(c.keys, c.values) for c in cache],
    )
    for c, b in zip(cache, buffers):
        advance(c, b)
    return h


class DecodeGraphs:
    """A model's compiled decode steps, one per KV quantization, each compiled on first use."""

    def __init__(self) -> None:
        self.steps: dict[tuple[int, int] | None, Callable[..., Any]] = {}

    def step(self, model: nn.Module, kind: tuple[int, int] | None) -> Callable[..., Any]:
        if kind not in self.steps:
            self.steps[kind] = mx.compile(step_function(model, kind), inputs=[model])
        return self.steps[kind]


def step_function(model: nn.Module, kind: tuple[int, int] | None) -> Callable[..., Any]:
    """The function `decode_graph_step` compiles: the model's call on `BufferSlots` over the
    buffers, masked to the `valid` leading positions; returns the hidden states and buffers."""

    def step(
        inputs: mx.array, position: mx.array, write: mx.array, valid: mx.array, buffers: list
    ) -> tuple[mx.array, list]:
        slots = [BufferSlots(b, position, write, kind) for b in buffers]
        first = buffers[0][0][0] if kind is not None else buffers[0][0]
        mask = mx.arange(first.shape[2]) < valid
        h = model(inputs, slots, mask=mask)
        return h, [(s.keys, s.values) for s in slots]

    return step
