"""Fast paths, chosen by an explicit policy (`FastPaths`) that the model holds.

Two fast paths, each the plain path's computation reordered (tests hold them equal to it):
- **padded experts** (prefill and training): a long chunk runs the routed experts as one padded
  batched matmul per projection on weights dequantized a group of experts at a time, each group
  run before the next is built; in training the backward dequantizes again instead of keeping
  the dense weights, LoRA adds its own batched product, and the trainer differentiates a layer
  a group at a time (`tuner/expert_groups.py`);
- **compiled decode step**: a single-token step runs everything but the cache update and
  attention in two `mx.compile`d functions (fewer, fused kernels and no per-op Python).

One workaround for a known MLX bug, named with the version it was seen on and off elsewhere until
measured there. `FastPaths.off()` is the plain path everywhere, workaround included.

Profiled on an H100 (MLX 0.32.4 CUDA, A13B shape, 4-bit g64; BENCHMARKS.md): for 512 tokens x
top-8, sorted `gather_qmm` of the fused gate+up experts takes 43 ms (4.7 TFLOP/s); dequantizing
the layer's experts (3.5 ms) and one batched `matmul` over (experts, capacity, D) rows takes
1.9 ms (108 TFLOP/s; 240 at 2048 tokens), with identical bf16 output. Decode is bound by host time
per graph node (about 7 us each), which the compiled step cuts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from .experts import SORT_THRESHOLD, GatheredGLU, GatheredLinear, weighted_sum

# Routed rows (tokens x k) from which a call takes the padded path, by backend; None: never.
# Measured (BENCHMARKS.md): on CUDA, dequantizing a layer's experts costs about what gather_qmm
# spends on ~350 rows; on the CPU, whose bf16 gather_qmm is far slower, the padded path wins from
# a few dozen rows. Apple GPUs keep sorted gather_qmm until measured there.
PADDED_MIN_ROWS = {"cuda": 512, "cpu": 64, "metal": None}
# Backends where the padded path takes half-precision rows only: on the CPU, float32 gathered
# experts beat it (`python -m benchmarks.cpu_dtype`, 200 tokens: LoRA step 6.8 s vs 9.3 padded,
# prefill 4.7 vs 5.3), while in bfloat16 it wins (53.2 s vs 55.5, 42.2 vs 44.3; the 128K head
# dominates there).
PADDED_HALF_PRECISION_ONLY = ("cpu",)
# Experts per batched matmul: bounds the dense weights alive at once (32 of A13B's experts: 1.6 GB
# of bf16 gate+up, 0.8 GB of down) to keep prefill's peak memory within 10% of the weights.
PADDED_EXPERT_GROUP = 32
# In training, where each group's vjp dequantizes it twice: A13B QLoRA at 2048 tokens on an H100
# peaked 52.0 GB with 8, 55.6 with 16, 61.7 with 32, at 719 / 903 / 919 tokens/s (BENCHMARKS.md,
# results/2026-11-26_h100_lora_memory_steps.jsonl): 8 keeps the step within weights + 6 GB.
PADDED_TRAINING_EXPERT_GROUP = 8
# Backends where the whole model's decode graph (decode.py) was measured to beat each layer's
# compiled step. Not CUDA: MLX 0.32.4's CUDA attention has no fused kernel for an array mask, so
# the graph's masked attention runs as a dozen unfused ops a layer (1,649 nodes a token against
# 1,357) and decode after 512 tokens on an H100 gave 78 tokens/s against 94 (BENCHMARKS.md,
# results/2026-12-05_h100_profile_decode_graph.jsonl). Apple GPUs until measured there.
DECODE_GRAPH_BACKENDS: tuple[str, ...] = ()
# MLX versions whose CUDA sorted `gather_mm` (unquantized experts) returned NaN or wrong rows at
# A13B shape and hit an illegal memory access at 320 rows (benchmarks/check_gather_mm.py).
# Quantized experts (`gather_qmm`) are fine there.
SORTED_GATHER_MM_BROKEN_ON_CUDA = ("0.32.4",)


def backend() -> str:
    """"cpu", "metal" or "cuda": where the default device computes."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths a model takes; the default fields are the plain path."""

    # Routed rows from which a call takes the padded experts; None: never.
    padded_min_rows: int | None = None
    # Whether float32 rows take them too (else half precision only).
    padded_float32: bool = True
    # Experts whose dense weights a padded call holds at once, in inference and in training.
    padded_expert_group: int = PADDED_EXPERT_GROUP
    padded_training_expert_group: int = PADDED_TRAINING_EXPERT_GROUP
    compiled_decode: bool = False
    # The whole model's single-token step as one compiled graph over the KV buffers (decode.py);
    # where a call cannot take it, `compiled_decode` applies.
    decode_graph: bool = False
    # Unquantized experts avoid sorted gather_mm (padded instead), for MLX's bug above.
    avoid_sorted_gather_mm: bool = False

    @classmethod
    def default(cls, on: str | None = None, mlx_version: str | None = None) -> FastPaths:
        """Every fast path measured to pay off on backend `on` (default: this one), and the
        workarounds that MLX version `mlx_version` (default: this one) needs."""
        on = on or backend()
        mlx_version = mlx_version or mx.__version__
        return cls(
            padded_min_rows=PADDED_MIN_ROWS.get(on),
            padded_float32=on not in PADDED_HALF_PRECISION_ONLY,
            compiled_decode=True,
            decode_graph=on in DECODE_GRAPH_BACKENDS,
            avoid_sorted_gather_mm=on == "cuda"
            and mlx_version in SORTED_GATHER_MM_BROKEN_ON_CUDA,
        )

    @classmethod
    def off(cls) -> FastPaths:
        """The plain path everywhere."""
        return cls()

    def takes_padded(self, experts: GatheredGLU, rows: int, dtype: mx.Dtype) -> bool:
        """Whether a call of `experts` on `rows` routed rows in `dtype` should try the padded
        path."""
        if self.pads(dtype) and rows >= self.padded_min_rows:
            return True
        unquantized = all(
            type(p) is GatheredLinear for p in (experts.gate_up_proj, experts.down_proj)
        )
        return self.avoid_sorted_gather_mm and rows >= SORT_THRESHOLD and unquantized

    def pads(self, dtype: mx.Dtype) -> bool:
        """Whether rows in `dtype` take the padded path once there are enough of them."""
        return self.padded_min_rows is not None and (self.padded_float32 or dtype != mx.float32)

    def reads_routing_counts(self, dtype: mx.Dtype) -> bool:
        """Whether the padded path may run on `dtype` rows. It reads routing counts on the host
        mid-graph: a function of the model that may take it must not be `mx.compile`d (it would
        fall back to the gathered experts)."""
        return self.pads(dtype) or self.avoid_sorted_gather_mm

    def takes_compiled_decode(self, layer: nn.Module, x: mx.array, **call: Any) -> bool:
        """Whether a decoder layer call `layer(x, **call)` can run as `compiled_decode_step`:
        one token with a cache, causal, no shared K/V, no explicit positions, a rotation that
        does not depend on the length, in eval mode."""
        return (
            self.compiled_decode
            and x.shape[1] == 1
            and call["mask"] is None
            and call["cache"] is not None
            and call["shared_kv"] is None
            and call["position_ids"] is None
            and not layer.training
            and "k_proj" in layer.self_attn
            and layer.self_attn.rotary_emb.dynamic_factor is None
        )


def set_fast_paths(model: nn.Module, policy: FastPaths) -> None:
    """Give `policy` to every module of `model` that holds one."""
    for _, module in model.named_modules():
        if hasattr(module, "fast_paths"):
            module.fast_paths = policy


@contextlib.contextmanager
def using(model: nn.Module, policy: FastPaths) -> Iterator[None]:
    """`model` takes `policy` within the block (`FastPaths.off()` for comparisons)."""
    previous = model.fast_paths
    set_fast_paths(model, policy)
    try:
        yield
    finally:
        set_fast_paths(model, previous)


def routed_experts(
    policy: FastPaths,
    experts: GatheredGLU,
    x: mx.array,
    indices: mx.array,
    weights: mx.array,
    training: bool = False,
) -> mx.array:
    """`experts(x, indices, weights)`, through the padded path where `policy` and the call allow.

    In inference each expert group is run before the next is built (see `padded_experts`); in
    training the call may be differentiated, and an evaluation under `mx.grad` would keep every
    group's dense weights for the backward, so the trainer runs the groups itself
    (`tuner/layerwise.py`).
    """
    if policy.takes_padded(experts, indices.size, x.dtype):
        group = policy.padded_training_expert_group if training else policy.padded_expert_group
        out = padded_experts(experts, x, indices, group, run_each_group=not training)
        if out is not None:
            return weighted_sum(out, weights)
    return experts(x, indices, weights)


def padded_blocks(counts: list[int]) -> tuple[int, list[tuple[int, int, int]]]:
    """The padded grid for each expert's routed row count: its capacity (a multiple of 8, for
    fewer distinct matmul shapes) and its blocks, (expert, first row, rows) over the rows sorted
    by expert.

    The capacity is the busiest expert's count, capped at twice the used experts' mean: a busier
    expert takes several blocks, so the grid stays within 3x the rows however skewed the routing
    (with one capacity for all, one expert taking every token made it `used` times the rows).
    """
    used = [count for count in counts if count]
    capacity = min(max(used), math.ceil(2 * sum(used) / len(used)))
    capacity = -(-capacity // 8) * 8
    blocks, start = [], 0
    for expert, count in enumerate(counts):
        for first in range(0, count, capacity):
            blocks.append((expert, start + first, min(capacity, count - first)))
        start += count
    return capacity, blocks


@dataclass(frozen=True)
class PaddedGrid:
    """Where one call's routed rows sit in the padded grid: blocks of `capacity` rows, each
    block one expert's (`padded_blocks`); padding cells repeat a real token and are never read
    back."""

    num_experts: int
    block_experts: list[int]
    tokens: mx.array  # (blocks, capacity): the token each cell computes
    cells: mx.array  # (rows,): each routed row's cell, rows in (token, choice) order
    shape: tuple[int, ...]  # the routing's (..., k)

    @classmethod
    def plan(cls, indices: mx.array, num_experts: int) -> PaddedGrid | None:
        """The grid for routing `indices` (..., k). The counts are read on the host, one
        synchronisation, so no token is ever dropped; None inside `mx.compile`, where the host
        cannot read them (`vjp` and `checkpoint` can)."""
        k = indices.shape[-1]
        flat = mx.stop_gradient(indices).flatten().astype(mx.int32)
        try:
            counts = mx.zeros((num_experts,), dtype=mx.int32).at[flat].add(1).tolist()
        except ValueError:  # "eval during function transformations": MLX's only sign of tracing
            return None
        capacity, blocks = padded_blocks(counts)
        # Sorted row p of expert e sits in cell p + base[e]: e's first block times the capacity,
        # less e's first sorted row (its blocks are consecutive and full but the last).
        base = [0] * num_experts
        for b, (expert, first, _) in reversed(list(enumerate(blocks))):
            base[expert] = b * capacity - first
        order = mx.argsort(flat)  # sorted row -> row
        cells = mx.array(base, dtype=mx.int32)[flat] + mx.argsort(order).astype(mx.int32)
        firsts = mx.array([first for _, first, _ in blocks], dtype=mx.int32)
        sizes = mx.array([size for _, _, size in blocks], dtype=mx.int32)
        c = mx.arange(capacity, dtype=mx.int32)
        # Each cell's token; padding cells repeat their block's first row.
        tokens = (order // k)[firsts[:, None] + mx.where(c < sizes[:, None], c, 0)]
        block_experts = [expert for expert, _, _ in blocks]
        return cls(num_experts, block_experts, tokens, cells, tuple(indices.shape))

    def rows(self, x: mx.array) -> mx.array:
        """The grid's input rows (blocks, capacity, D) from tokens `x` (..., D)."""
        return x.reshape(-1, x.shape[-1])[self.tokens]

    def groups(self, size: int) -> list[tuple[slice, list[int] | None]]:
        """The grid's blocks `size` at a time: their slice, and their experts (None: all, in
        order, which every projection reads without a copy)."""
        out = []
        for a in range(0, len(self.block_experts), size):
            experts = self.block_experts[a : a + size]
            every = experts == list(range(self.num_experts))
            out.append((slice(a, a + size), None if every else experts))
        return out

    def unpad(self, outs: list[mx.array]) -> mx.array:
        """Each routed row's output (..., k, D) from the groups' outputs, in grid order."""
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        out = out.reshape(-1, out.shape[-1])[self.cells]
        return out.reshape(*self.shape, out.shape[-1])


def takes_padded_groups(experts: GatheredGLU) -> bool:
    """Whether both projections have the padded path's `batched` product (LoRA adapters add
    theirs there); a foreign wrapper must see its own call."""
    return all(hasattr(p, "batched") for p in (experts.gate_up_proj, experts.down_proj))


def padded_glu(experts: GatheredGLU, rows: mx.array, group: list[int] | None) -> mx.array:
    """The experts on one group's padded rows (n, capacity, D): block j through `group[j]`."""
    h = experts.gate_up_proj.batched(rows, group)
    gate, up = mx.split(h, [experts.intermediate_size], axis=-1)
    return experts.down_proj.batched(nn.silu(gate) * up, group)


def padded_experts(
    experts: GatheredGLU,
    x: mx.array,
    indices: mx.array,
    expert_group: int,
    run_each_group: bool = False,
) -> mx.array | None:
    """Each row's expert output (..., k, D), as batched matmuls over (blocks, capacity, D),
    `expert_group` blocks at a time. None where a projection has no `batched` product or inside
    `mx.compile` (`PaddedGrid.plan`).

    `run_each_group` evaluates each group before the next is built: a GPU frees a kernel's inputs
    only once it has run, so unsynchronised groups piled up their dense weights (an A13B layer's
    padded forward at 2048 tokens on an H100 held 3.7 GB in groups of 32 and 4.5 in groups of 8
    built as one graph, 0.8 GB in groups of 8 run one at a time). Only outside `mx.grad`, which
    would keep what it evaluates for the backward.
    """
    if not takes_padded_groups(experts):
        return None
    grid = PaddedGrid.plan(indices, experts.gate_up_proj.dims[0])
    if grid is None:
        return None
    rows = grid.rows(x)
    outs = []
    for part, group in grid.groups(expert_group):
        outs.append(padded_glu(experts, rows[part], group))
        if run_each_group:
            mx.eval(outs[-1])
    return grid.unpad(outs)


def compiled_decode_step(layer: nn.Module, x: mx.array, cache: Any) -> tuple[mx.array, Any]:
    """A decoder layer's single-token step, computed as `layer(x, None, cache)`.

    The layer's parameters are the compiled functions' implicit inputs, so new weights (loading,
    adapters) are picked up; a changed structure traces anew. They are kept on the layer under a
    leading underscore, which keeps them out of its parameters.
    """
    if layer._decode_fns is None:
        layer._decode_fns = (
            mx.compile(lambda x, offset: _decode_pre(layer, x, offset), inputs=[layer]),
            mx.compile(lambda x, out: _decode_post(layer, x, out), inputs=[layer]),
        )
    pre, post = layer._decode_fns
    queries, keys, values, shared_kv = pre(x, mx.array(cache.offset))
    keys, values = cache.update_and_fetch(keys, values)
    attn = layer.self_attn
    out = scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=attn.scale, mask=None
    )
    return post(x, out), shared_kv


def _decode_pre(layer: nn.Module, x: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
    """Input norm, projections, RoPE and QK-norm: everything before the cache."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shared_kv = (attn.k_proj(h), attn.v_proj(h))
    return *attn.heads(attn.q_proj(h), shared_kv, offset), shared_kv


def _decode_post(layer: nn.Module, x: mx.array, attn_out: mx.array) -> mx.array:
    """Output projection, residuals and the MoE block: everything after attention."""
    h = x + layer.self_attn.output(attn_out)
    return h + layer.mlp(layer.post_attention_layernorm(h))
