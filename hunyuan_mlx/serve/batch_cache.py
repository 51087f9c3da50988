"""A quantized KV cache that mlx-lm's `BatchGenerator` can batch (mlx-lm has none: its server
serves `--kv-bits` one request at a time).

`BatchQuantizedKVCache` is mlx-lm's `BatchKVCache` (left-padded sequences, an offset each) over
`mx.quantize`d keys and values: each buffer a (data, scales, biases) triple, as in mlx-lm's
`QuantizedKVCache`, so that mlx-lm's attention takes its quantized kernel for both. Keys are
quantized a position at a time (groups run along the head dimension), so padding a sequence or
sharing a batch leaves its quantized values, and its attention, those it has alone.
`BatchableQuantizedKVCache` is one sequence's `QuantizedKVCache` that merges into a batch, and
what a batch's sequence leaves as (the prompt cache keeps it).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map, tree_reduce
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache, dynamic_roll

Quantized = tuple[mx.array, mx.array, mx.array]  # mx.quantize's (data, scales, biases)


class BatchableQuantizedKVCache(QuantizedKVCache):
    """mlx-lm's `QuantizedKVCache`, which a batch can take in (`merge`)."""

    @classmethod
    def merge(cls, caches: list[QuantizedKVCache]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


class BatchQuantizedKVCache(BatchKVCache):
    """mlx-lm's `BatchKVCache` whose keys and values are stored quantized (`group_size`, `bits`)."""

    def __init__(self, left_padding: list[int], group_size: int, bits: int):
        super().__init__(left_padding)
        self.group_size = group_size
        self.bits = bits

    def _empty(self, like: mx.array, length: int) -> Quantized:
        """Zeros for `length` positions of `like`'s sequences and heads, quantized."""
        B, H, _, D = like.shape
        per_word = 32 // self.bits
        groups = (B, H, length, D // self.group_size)
        return (
            mx.zeros((B, H, length, D // per_word), dtype=mx.uint32),
            mx.zeros(groups, dtype=like.dtype),
            mx.zeros(groups, dtype=like.dtype),
        )

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[Quantized, Quantized]:
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            length = (self.step + n - 1) // self.step * self.step
            new = (self._empty(keys, length), self._empty(values, length))
            if self.keys is None:
                self.keys, self.values = new
            else:
                kept = tree_map(lambda x: x[..., :prev, :], (self.keys, self.values))
                self.keys, self.values = tree_map(
                    lambda x, y: mx.concatenate([x, y], axis=2), kept, new
                )
        self.offset = self.offset + n
        self._idx += n
        for buffer, update in ((self.keys, keys), (self.values, values)):
            quantized = mx.quantize(update, group_size=self.group_size, bits=self.bits)
            for stored, part in zip(buffer, quantized):
                stored[..., prev : self._idx, :] = part
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        return tree_map(lambda x: x[..., : self._idx, :], (self.keys, self.values))

    def finalize(self) -> None:
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys, self.values = tree_map(
                lambda x: dynamic_roll(x, padding[:, None], axis=2), (self.keys, self.values)
            )
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    def filter(self, batch_indices: Any) -> None:
        """Keep the sequences `batch_indices`, dropping the padding all of them have."""
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(
                    lambda x: x[..., shift:, :], (self.keys, self.values)
                )
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Append `other`'s sequences, both right-aligned at the longer one's index."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        like = self if self.keys is not None else other
        index = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def aligned(c: BatchQuantizedKVCache) -> tuple[Any, Any, mx.array, mx.array]:
            left = index - c._idx
            buffers = (c.keys, c.values)
            if c.keys is None:
                buffers = tree_map(
                    lambda x: mx.zeros((len(c.offset), x.shape[1], 0, x.shape[3]), x.dtype),
                    (like.keys, like.values),
                )

            def pad(x: mx.array) -> mx.array:
                right = size - x.shape[2] - left
                if right < 0:
                    x, right = x[..., :right, :], 0
                return mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)])

            return (*tree_map(pad, buffers), c.offset, c.left_padding + left)

        mine, theirs = aligned(self), aligned(other)
        self.keys, self.values = tree_map(
            lambda x, y: mx.concatenate([x, y]), (mine[0], mine[1]), (theirs[0], theirs[1])
        )
        self.offset = mx.concatenate([mine[2], theirs[2]])
        self.left_padding = mx.concatenate([mine[3], theirs[3]])
        self._idx = index

    def extract(self, idx: int) -> BatchableQuantizedKVCache:
        """Sequence `idx` alone, without its padding."""
        cache = BatchableQuantizedKVCache(self.group_size, self.bits)
        padding = self.left_padding.tolist()[idx]
        cache.keys, cache.values = tree_map(
            lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx]),
            (self.keys, self.values),
        )
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list[QuantizedKVCache]) -> BatchQuantizedKVCache:
        """One batch of `caches` (all of one group size and bits), left-padded to the longest."""
        group_size, bits = caches[0].group_size, caches[0].bits
        if any((c.group_size, c.bits) != (group_size, bits) for c in caches):
            raise ValueError("quantized KV caches of different group sizes or bits cannot batch")
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        batch = cls(padding, group_size, bits)
        if longest == 0:
            return batch
        first = next(c for c in caches if c.keys is not None)

        def zeros(x: mx.array) -> mx.array:
            return mx.zeros((len(caches), x.shape[1], longest, x.shape[3]), dtype=x.dtype)

        batch.keys, batch.values = tree_map(zeros, (first.keys, first.values))
        for i, (p, c) in enumerate(zip(padding, caches)):
            if c.keys is not None:
                for stored, part in zip(
                    (*batch.keys, *batch.values), (*c.keys, *c.values)
                ):
                    stored[i : i + 1, :, p:] = part[..., : c.offset, :]
        batch.offset += longest
        batch._idx = longest
        return batch

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return tree_reduce(lambda total, x: total + x.nbytes, (self.keys, self.values), 0)
