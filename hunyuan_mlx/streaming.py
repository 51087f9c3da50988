"""Routed experts streamed from disk within a memory budget (`load(..., memory_budget=...)`).

Where a checkpoint does not fit the budget, everything but the routed experts stays resident and
each MoE layer's `GatheredGLU` is swapped for a `StreamedGLU`: the same call, whose experts come
from an `ExpertStore`, which reads one expert's rows of the stacked (E, out, in) tensors (one
contiguous byte range per tensor) from the safetensors shards with `os.preadv` on reader threads,
never a whole tensor, into a cache of experts sized to what the budget leaves.

- A call reads each expert it needs once (a prefill chunk: once per layer and chunk), and
  computes expert by expert as the reads arrive, `READ_AHEAD` reads in flight.
- Before computing, it guesses the next layer's experts with that layer's router applied to the
  current hidden state, and reads the guessed ones not cached (`prefetch`); `ExpertStore.stats`
  counts how often the guess was right.
- Eviction keeps what the last forward pass used (the previous token's experts, where they fit),
  then the most often used: least frequently used first, ties least recently.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .files import format_size, stored_tensors, weight_files
from .models.config import HunYuanMoEV1Config
from .models.experts import SORT_THRESHOLD, GatheredGLU, weighted_sum
from .models.fast_paths import FastPaths, set_fast_paths

# Expert reads in flight while a call computes (the reads a fast SSD needs to stay busy).
READ_AHEAD = 4
READER_THREADS = 4
# safetensors dtype -> the numpy type its bytes are read as (bfloat16 as its 16 bits).
NUMPY_TYPES = {
    "U8": np.uint8,
    "U32": np.uint32,
    "I32": np.int32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F32": np.float32,
}


def machine_memory() -> int:
    """Bytes the weights may take: MLX's recommended working set on a GPU that reports one
    (Apple silicon), else the machine's physical memory."""
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if recommended:
        return int(recommended)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(path: Path, weight_bytes: int) -> None:
    """Refuse, before any weight is read, a model whose weights exceed the machine's memory."""
    memory = machine_memory()
    if weight_bytes > memory:
        raise ValueError(
            f"{path}: its weights take {format_size(weight_bytes)}, more than this machine's "
            f"{format_size(memory)}; stream its routed experts from disk with --memory-budget "
            f"SIZE (e.g. --memory-budget {max(1, int(memory * 0.75 / 1e9))}GB)"
        )


@dataclass(frozen=True)
class ExpertTensor:
    """Where each expert's slice of one stacked tensor lies: (file, first byte) per expert."""

    dtype: str  # safetensors'
    shape: tuple[int, ...]  # one expert's
    places: tuple[tuple[Path, int], ...]

    @property
    def nbytes(self) -> int:
        """One expert's bytes on disk."""
        return math.prod(self.shape) * np.dtype(NUMPY_TYPES[self.dtype]).itemsize

    def memory_bytes(self, dtype: mx.Dtype | None) -> int:
        """One expert's bytes in memory: floats cast to `dtype` (float32 scales on the CPU)."""
        if dtype is None or self.dtype not in ("F16", "BF16", "F32"):
            return self.nbytes
        return math.prod(self.shape) * dtype.size


def find_expert_tensor(
    tensors: dict[str, tuple[Path, str, tuple[int, ...], int]],
    prefix: str,
    proj: str,
    suffix: str,
    num_experts: int,
) -> ExpertTensor | None:
    """Layer `prefix`'s (`...mlp`) experts' `proj.suffix` as the checkpoint stores it: stacked
    (this project's, mlx-lm's `switch_mlp`, transformers' bare 3-D parameter), or per expert (the
    release's)."""
    stacked = [f"{prefix}.experts.{proj}.{suffix}", f"{prefix}.switch_mlp.{proj}.{suffix}"]
    if suffix == "weight":
        stacked.append(f"{prefix}.experts.{proj}")
    for name in stacked:
        if name in tensors:
            file, dtype, shape, start = tensors[name]
            one = ExpertTensor(dtype, shape[1:], ())
            places = tuple((file, start + e * one.nbytes) for e in range(num_experts))
            return ExpertTensor(dtype, shape[1:], places)
    names = [f"{prefix}.experts.{e}.{proj}.{suffix}" for e in range(num_experts)]
    if all(name in tensors for name in names):
        _, dtype, shape, _ = tensors[names[0]]
        return ExpertTensor(dtype, shape, tuple((tensors[n][0], tensors[n][3]) for n in names))
    return None


def expert_tensors(
    tensors: dict[str, tuple[Path, str, tuple[int, ...], int]],
    prefix: str,
    params: list[str],
    num_experts: int,
) -> dict[str, list[ExpertTensor]]:
    """Each of a layer's expert parameters (`gate_up_proj.weight`, ...) as the pieces its rows
    are read from, concatenated: the fused gate and up, or the gate's and the up's."""
    out = {}
    for param in params:
        proj, suffix = param.split(".")
        found = find_expert_tensor(tensors, prefix, proj, suffix, num_experts)
        pieces = (
            [found]
            if found is not None
            else [
                find_expert_tensor(tensors, prefix, p, suffix, num_experts)
                for p in (("gate_proj", "up_proj") if proj == "gate_up_proj" else ())
            ]
        )
        if not pieces or None in pieces:
            raise ValueError(f"Checkpoint has no readable {prefix}.experts.{param} to stream")
        out[param] = pieces
    return out


class ExpertReadError(OSError):
    """A shard that went missing or short after the model loaded."""


def read_expert(pieces: list[ExpertTensor], expert: int) -> list[np.ndarray]:
    """The bytes of one expert's slice of each piece, read with one `preadv` each."""
    out = []
    for piece in pieces:
        file, offset = piece.places[expert]
        buffer = np.empty(piece.nbytes, dtype=np.uint8)
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise ExpertReadError(
                f"{file} is missing: it holds streamed experts and was there when the model loaded"
            ) from None
        try:
            done = 0
            while done < piece.nbytes:
                n = os.preadv(fd, [memoryview(buffer)[done:]], offset + done)
                if n == 0:
                    raise ExpertReadError(
                        f"{file} is truncated: expert {expert}'s bytes {offset}..."
                        f"{offset + piece.nbytes} run past its end ({os.fstat(fd).st_size})"
                    )
                done += n
        finally:
            os.close(fd)
        out.append(buffer.view(NUMPY_TYPES[piece.dtype]).reshape(piece.shape))
    return out


def to_mlx(pieces: list[ExpertTensor], arrays: list[np.ndarray], dtype: mx.Dtype | None):
    """One parameter of one expert as MLX computes it: pieces concatenated, floats as `dtype`."""
    parts = [
        mx.array(a).view(mx.bfloat16) if piece.dtype == "BF16" else mx.array(a)
        for piece, a in zip(pieces, arrays)
    ]
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    if dtype is not None and mx.issubdtype(out.dtype, mx.floating):
        out = out.astype(dtype)
    return out


class ExpertStore:
    """The routed experts of every layer, read on demand into a cache of `capacity` bytes."""

    def __init__(
        self,
        layers: list[dict[str, list[ExpertTensor]]],
        formats: list[dict[str, dict[str, Any] | None]],
        dtype: mx.Dtype | None,
        capacity: int,
    ):
        self.layers = layers
        self.formats = formats  # per layer and projection: its quantization, None if dense
        self.dtype = dtype
        self.capacity = capacity
        self.routers: list[nn.Module | None] = [None] * len(layers)  # for the next layer's guess
        self.top_k = [0] * len(layers)
        self.cache: dict[tuple[int, int], dict[str, mx.array]] = {}
        self.cached_bytes = 0
        self.uses: Counter[tuple[int, int]] = Counter()
        self.last_use: dict[tuple[int, int], int] = {}
        self.clock = 0  # calls so far
        self.pending: dict[tuple[int, int], Future] = {}  # prefetches
        self.guessed: set[tuple[int, int]] = set()
        self.stats: Counter[str] = Counter()
        self.readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="expert-reader")

    def expert_bytes(self, layer: int, on_disk: bool = False) -> int:
        """Bytes one expert of `layer` takes in memory (or on disk)."""
        return sum(
            p.nbytes if on_disk else p.memory_bytes(self.dtype)
            for pieces in self.layers[layer].values()
            for p in pieces
        )

    def read(self, key: tuple[int, int]) -> list[list[np.ndarray]]:
        layer, expert = key
        return [read_expert(pieces, expert) for pieces in self.layers[layer].values()]

    def admit(self, key: tuple[int, int], raw: list[list[np.ndarray]], pinned: set) -> dict:
        """Expert `key` from its bytes into the cache, evicting what is worth least."""
        self.stats["reads"] += 1
        self.stats["bytes_read"] += sum(a.nbytes for arrays in raw for a in arrays)
        params = self.layers[key[0]]
        arrays = {
            name: to_mlx(pieces, r, self.dtype) for (name, pieces), r in zip(params.items(), raw)
        }
        mx.eval(arrays)
        size = sum(a.nbytes for a in arrays.values())
        recent = self.clock - len(self.layers)  # calls of the last forward pass come after this
        while self.cached_bytes + size > self.capacity:
            victims = [k for k in self.cache if k not in pinned]
            if not victims:
                break
            victim = min(
                victims, key=lambda k: (self.last_use[k] > recent, self.uses[k], self.last_use[k])
            )
            self.cached_bytes -= sum(a.nbytes for a in self.cache.pop(victim).values())
        self.cache[key] = arrays
        self.cached_bytes += size
        return arrays

    def fetch(self, layer: int, experts: list[int], guess: list[int]):
        """Yield the arrays of `layer`'s `experts` in order, reading the missing ones
        `READ_AHEAD` at a time; once all are asked for, prefetch the `guess` for the next
        layer."""
        self.clock += 1
        keys = [(layer, e) for e in experts]
        pinned = set(keys)
        for key in keys:
            self.uses[key] += 1
            self.last_use[key] = self.clock
        if any(key[0] == layer for key in self.guessed):
            self.stats["guessed"] += sum(key[0] == layer for key in self.guessed)
            self.stats["guessed_right"] += len(self.guessed & pinned)
        self.guessed = {(layer + 1, e) for e in guess} if layer + 1 < len(self.layers) else set()
        futures: dict[tuple[int, int], Future] = {}
        for key in [k for k in self.pending if k[0] == layer and k not in pinned]:
            if not self.pending.pop(key).cancel():  # a wrong guess, already read
                self.stats["bytes_read"] += self.expert_bytes(layer, on_disk=True)
                self.stats["wasted_reads"] += 1
        misses = [key for key in keys if key not in self.cache]
        queue = iter(misses)

        def ask_next() -> None:
            key = next(queue, None)
            if key is None:
                self.prefetch(self.guessed)
                return
            if key in self.pending:
                self.stats["prefetched"] += 1
                futures[key] = self.pending.pop(key)
            else:
                futures[key] = self.readers.submit(self.read, key)

        for _ in range(READ_AHEAD + 1):
            ask_next()
        self.stats["calls"] += 1
        self.stats["needed"] += len(keys)
        for key in keys:
            if key in self.cache:
                self.stats["hits"] += 1
                yield self.cache[key]
                continue
            raw = futures.pop(key).result()
            ask_next()
            yield self.admit(key, raw, pinned)

    def prefetch(self, keys: set[tuple[int, int]]) -> None:
        """Start reading the guessed experts of the next layer that are not cached."""
        for key in sorted(keys):
            if key not in self.cache and key not in self.pending:
                self.pending[key] = self.readers.submit(self.read, key)

    def guess_logits(self, layer: int, x: mx.array) -> mx.array | None:
        """The next layer's router on `x`, the current layer's input (lazy; None at the end)."""
        nxt = layer + 1
        if nxt >= len(self.layers) or self.routers[nxt] is None:
            return None
        return self.routers[nxt](x)


class StreamedGLU(nn.Module):
    """`GatheredGLU`'s call with the experts read from an `ExpertStore`: x (..., D), expert ids
    and weights (..., k) -> the weighted sum of the chosen experts' outputs (..., D).

    The routing is read on the host (one synchronisation per layer), the rows sorted by expert,
    and each expert needed computes its rows as soon as its weights are there.
    """

    def __init__(self, experts: GatheredGLU, layer: int, store: ExpertStore):
        super().__init__()
        self.intermediate_size = experts.intermediate_size
        self.layer = layer
        self.store = store  # not a module: the experts' arrays stay out of the parameters

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        indices = mx.stop_gradient(indices)
        logits = self.store.guess_logits(self.layer, x)
        mx.eval(indices, *([] if logits is None else [logits]))
        flat = np.array(indices).reshape(-1)
        k = indices.shape[-1]
        guess = []
        if logits is not None:
            top = np.argpartition(np.array(logits).reshape(-1, logits.shape[-1]), -k, axis=-1)
            votes = Counter(top[:, -k:].reshape(-1).tolist())
            guess = [e for e, _ in votes.most_common(self.store.top_k[self.layer + 1] or k)]
        order = np.argsort(flat, kind="stable")
        experts, starts = np.unique(flat[order], return_index=True)
        ends = [*starts[1:].tolist(), len(flat)]
        rows = x.reshape(-1, x.shape[-1])[mx.array(order // k, dtype=mx.uint32)]
        # As `GatheredGLU.gathered`: few rows fold the weights into the down projection's input.
        folded = indices.size < SORT_THRESHOLD
        scales = weights.reshape(-1)[mx.array(order, dtype=mx.uint32)].astype(x.dtype)[:, None]
        outs = []
        fetched = self.store.fetch(self.layer, experts.tolist(), guess)
        for arrays, a, b in zip(fetched, starts.tolist(), ends):
            outs.append(self.glu(rows[a:b], arrays, scales[a:b] if folded else None))
            mx.async_eval(outs[-1])
        out = mx.concatenate(outs)[mx.array(np.argsort(order), dtype=mx.uint32)]
        out = out.reshape(*indices.shape, out.shape[-1])
        return out.sum(axis=-2) if folded else weighted_sum(out, weights)

    def glu(self, x: mx.array, arrays: dict[str, mx.array], scale: mx.array | None) -> mx.array:
        """One expert's SwiGLU on its rows x (n, D); `scale` (n, 1) multiplies the down
        projection's input."""
        gate, up = mx.split(self.project(x, arrays, "gate_up_proj"), [self.intermediate_size], -1)
        h = nn.silu(gate) * up
        return self.project(h if scale is None else h * scale, arrays, "down_proj")

    def project(self, x: mx.array, arrays: dict[str, mx.array], proj: str) -> mx.array:
        quantization = self.store.formats[self.layer][proj]
        weight = arrays[f"{proj}.weight"]
        if quantization is None:
            return x @ weight.T
        return mx.quantized_matmul(
            x,
            weight,
            arrays[f"{proj}.scales"],
            arrays.get(f"{proj}.biases"),
            transpose=True,
            **quantization,
        )


def projection_format(linear: nn.Module) -> dict[str, Any] | None:
    """A gathered linear's quantization (group size, bits, mode), None if dense."""
    if "scales" not in linear:
        return None
    return {"group_size": linear.group_size, "bits": linear.bits, "mode": linear.mode}


def staging_bytes(config: HunYuanMoEV1Config, expert_bytes: int) -> int:
    """Memory for the expert reads in flight: those ahead of a call, the next layer's prefetch
    and MLX's copy of the one being admitted."""
    k = max(config.layer_moe_topk(i) for i in range(config.num_hidden_layers))
    experts = max(config.layer_num_experts(i) for i in range(config.num_hidden_layers))
    return (min(READ_AHEAD + 1, experts) + min(k, experts) + 1) * expert_bytes


def stream_experts(
    model: nn.Module,
    model_path: Path,
    budget: int,
    resident_bytes: int,
    dtype: mx.Dtype | None,
) -> ExpertStore:
    """Swap every layer's routed experts for streamed ones reading `model_path`'s shards, in
    place, with a cache of what `budget` leaves after `resident_bytes` and the reads in flight;
    too small a budget is refused, naming the least that works.

    The budget is the weights' memory: activations and the KV cache (which grow with the
    prompt chunk and the context) come on top, as they do for a resident model."""
    tensors = {}
    for file in weight_files(model_path):
        for name, (kind, shape, start) in stored_tensors(file).items():
            tensors[name] = (file, kind, shape, start)
    config = model.config
    layers, formats = [], []
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        params = [name for name, _ in tree_flatten(experts.parameters())]
        num_experts = experts.gate_up_proj.dims[0]
        layers.append(expert_tensors(tensors, f"model.layers.{i}.mlp", params, num_experts))
        formats.append(
            {p: projection_format(getattr(experts, p)) for p in ("gate_up_proj", "down_proj")}
        )
    store = ExpertStore(layers, formats, dtype, capacity=0)
    layer_bytes = max(
        store.expert_bytes(i) * layer.mlp.experts.gate_up_proj.dims[0]
        for i, layer in enumerate(model.model.layers)
    )
    staging = staging_bytes(config, max(map(store.expert_bytes, range(len(layers)))))
    least = resident_bytes + staging + layer_bytes
    if budget < least:
        raise ValueError(
            f"--memory-budget {format_size(budget)} is too small for {model_path}: its resident "
            f"weights take {format_size(resident_bytes)}, expert reads in flight "
            f"{format_size(staging)} and one layer's experts {format_size(layer_bytes)}; give at "
            f"least {format_size(least)}"
        )
    store.capacity = budget - resident_bytes - staging
    for i, layer in enumerate(model.model.layers):
        store.routers[i] = layer.mlp.get("gate")
        store.top_k[i] = layer.mlp.top_k
        layer.mlp.experts = StreamedGLU(layer.mlp.experts, i, store)
    set_fast_paths(model, streamed_policy(model.fast_paths))
    # Freed buffers (evicted experts, a chunk's activations) go back to the system beyond what
    # the reads in flight need, rather than pile up in MLX's cache outside the budget.
    mx.set_cache_limit(staging)
    return store


def streamed_policy(policy: FastPaths) -> FastPaths:
    """`policy` for streamed experts: they read the routing on the host mid-layer, which a
    compiled decode step cannot do."""
    return replace(policy, compiled_decode=False, decode_graph=False)


def expert_store(model: nn.Module) -> ExpertStore | None:
    """The store a streamed model reads its experts from (its `stats`), None if resident."""
    for layer in model.model.layers:
        if isinstance(layer.mlp.experts, StreamedGLU):
            return layer.mlp.experts.store
    return None
