"""Fast paths, chosen by an explicit policy (`FastPaths`) that the model holds.

The fast paths, each the plain path's computation reordered (tests hold them equal to it):
- **padded experts** (prefill and training): a long chunk runs the routed experts as one padded
  batched matmul per projection on weights dequantized a group of experts at a time, each group
  run before the next is built; in training the backward dequantizes again instead of keeping
  the dense weights, LoRA adds its own batched product, and the trainer differentiates a layer
  a group at a time (`tuner/expert_groups.py`). The experts pick it themselves from the policy
  (`experts.GatheredGLU.kernel`);
- **every expert on every token** (a batch's decode on CUDA): each expert's weights read once for
  all of a call's tokens, where CUDA's `gather_qmm` reads them once a routed row
  (`experts.GatheredGLU.every_expert`);
- **gathered pieces**: a long call of the gathered experts a piece of tokens at a time, each run
  before the next is built, in inference and in the trainer (memory, not speed);
- **compiled decode step**: a single-token step runs everything but the cache update and
  attention in two `mx.compile`d functions (fewer, fused kernels and no per-op Python).

Workarounds for known MLX bugs, each named with the version it was seen on and off elsewhere
until seen there. `FastPaths.off()` is the plain path everywhere, workarounds included.

Profiled on an H100 (MLX 0.32.4 CUDA, A13B shape, 4-bit g64; BENCHMARKS.md): for 512 tokens x
top-8, sorted `gather_qmm` of the fused gate+up experts takes 43 ms (4.7 TFLOP/s); dequantizing
the layer's experts (3.5 ms) and one batched `matmul` over (experts, capacity, D) rows takes
1.9 ms (108 TFLOP/s; 240 at 2048 tokens), with identical bf16 output. Decode is bound by host time
per graph node (about 7 us each), which the compiled step cuts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from . import thresholds

# Routed rows (tokens x k) from which a call takes the padded path, by backend; None: never.
# Measured (BENCHMARKS.md): on CUDA, dequantizing a layer's experts costs about what gather_qmm
# spends on ~350 rows; on the CPU, whose bf16 gather_qmm is far slower, the padded path wins from
# a few dozen rows. Apple GPUs keep sorted gather_qmm until `hunyuan-mlx tune` measures the padded
# kernel faster there (`FastPaths.measured_min_rows`).
PADDED_MIN_ROWS = {"cuda": 512, "cpu": 64, "metal": None}
# The names `--fast-paths` takes: the policy measured on this machine (`auto`), the plain path
# (`off`), or a backend's built-in defaults.
POLICY_NAMES = ("auto", "off", "cpu", "cuda", "metal")
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
# Routed rows a call of the gathered experts runs at once: a longer one goes in pieces
# of whole tokens, each run before the next is built, as the padded path's expert groups are (a
# GPU frees a kernel's working arrays only once it has run). On an H100, MLX 0.32.4's sorted
# gather_qmm held about 14 GB over A13B's weights for a 2,048-token prefill chunk (16,384 rows)
# built as one graph; in pieces of 4,096 the Metal policy's prefill peaked 2.2% over weights and KV
# cache at the same speed, and its QLoRA step at weights + 3.3 GB against 6.3 (BENCHMARKS.md,
# results/2026-12-06_h100_{prefill,lora}_metal_pieces_a13b.jsonl). On the CPU the pieces cost no
# time (34 s either way for a 2,048-token call). The layer-at-a-time trainer takes a longer call's
# vjp a piece at a time too (`expert_groups.py`).
GATHERED_PIECE_ROWS = 4096
# Routed rows from which a call below the padded path's rows runs every expert on every token
# (`GatheredGLU.every_expert`), by backend; None: never. On an H100 (MLX 0.32.4 CUDA, A13B shape,
# 4-bit g64, bf16; `benchmarks.profile_moe`, BENCHMARKS.md) a layer's routed experts took, at 2 /
# 4 / 8 / 16 / 32 tokens of top-8, 0.49 / 0.78 / 1.29 / 2.30 / 4.30 ms on the routed rows
# against 1.30 / 1.29 / 1.30 / 1.31 / 2.21 every expert on every token: CUDA's `gather_qmm` reads
# an expert's weights once a row, so the routed rows cost more from 64 rows (8 tokens) on; 96 lies
# between the tie and 1.75x. The CPU computes 8x the products (compute-bound there); Apple GPUs
# until `hunyuan-mlx tune` measures it there (`FastPaths.every_expert_rows`).
EVERY_EXPERT_FROM = {"cuda": 96, "cpu": None, "metal": None}
# Backends where the whole model's decode graph (decode.py) was measured to beat each layer's
# compiled step. Not CUDA: MLX 0.32.4's CUDA attention has no fused kernel for an array mask, so
# the graph's masked attention runs as a dozen unfused ops a layer (1,649 nodes a token against
# 1,357) and decode after 512 tokens on an H100 gave 78 tokens/s against 94 (BENCHMARKS.md,
# results/2026-12-05_h100_profile_decode_graph.jsonl). Apple GPUs until measured there.
DECODE_GRAPH_BACKENDS: tuple[str, ...] = ()
# MLX versions whose CUDA sorted `gather_mm` (unquantized experts) returned NaN or wrong rows at
# A13B shape and hit an illegal memory access at 320 rows (BENCHMARKS.md,
# results/2026-11-25_h100_check_gather_mm.jsonl). Quantized experts (`gather_qmm`) are fine there.
SORTED_GATHER_MM_BROKEN_ON_CUDA = ("0.32.4",)
# MLX versions whose CUDA `quantized_matmul` has no kernel for a quantized KV cache's attention
# over several queries (mlx-lm's `quantized_scaled_dot_product_attention`): an h100 server with
# `--kv-bits 8 --quantized-kv-start 0` failed every prefill with "No implementation for problem
# shape: 510x510x128x32, ... bits: 8, group size: 64" (2026-12-06). A single query (decode) runs.
QUANTIZED_ATTENTION_BROKEN_ON_CUDA = ("0.32.4",)


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
    # Routed rows from which a call below the padded rows runs every expert on every token
    # (`EVERY_EXPERT_FROM`); None: never.
    every_expert_from: int | None = None
    # Routed rows a call of the gathered experts runs at once, in inference and in the trainer's
    # layer vjp, each piece evaluated before the next is built (`GATHERED_PIECE_ROWS`); None:
    # the whole call as one graph.
    gathered_piece_rows: int | None = None
    # Unquantized experts avoid sorted gather_mm (padded instead), for MLX's bug above.
    avoid_sorted_gather_mm: bool = False
    # Several queries over a quantized KV cache attend over its dequantized keys and values, for
    # MLX's bug above (`attention`).
    dequantize_kv_for_queries: bool = False
    # QLoRA's step goes a decoder layer at a time (`tuner/layerwise.py`): what bounds its memory
    # on every backend, whichever experts kernel runs.
    layerwise_training: bool = False
    # Thresholds measured on this machine (`thresholds.py`), (key, rows) by `thresholds.key`:
    # they replace `padded_min_rows` and `padded_float32`, or `every_expert_from`, for the
    # experts they name.
    measured_min_rows: tuple[tuple[str, int | None], ...] = ()
    # Where the thresholds and decode's choice came from: "measured here", "built-in", "forced"
    # or "off".
    source: str = field(default="off", compare=False)

    @classmethod
    def default(cls, on: str | None = None, mlx_version: str | None = None) -> FastPaths:
        """Every fast path measured to pay off on backend `on`, and the workarounds that MLX
        version `mlx_version` (default: this one) needs. Without `on`: this backend, with the
        thresholds `python -m hunyuan_mlx.tune` measured here where it has (`thresholds.py`);
        a named backend gets its built-in thresholds ("forced")."""
        measured = {} if on is not None else thresholds.cached()
        backend_ = on or backend()
        mlx_version = mlx_version or mx.__version__
        source = "forced" if on is not None else "measured here" if measured else "built-in"
        decode_graph = backend_ in DECODE_GRAPH_BACKENDS
        if thresholds.DECODE_GRAPH in measured:  # 1: the graph was faster here; null: not
            decode_graph = measured.pop(thresholds.DECODE_GRAPH) is not None
        return cls(
            padded_min_rows=PADDED_MIN_ROWS.get(backend_),
            padded_float32=backend_ not in PADDED_HALF_PRECISION_ONLY,
            compiled_decode=True,
            decode_graph=decode_graph,
            every_expert_from=EVERY_EXPERT_FROM.get(backend_),
            gathered_piece_rows=GATHERED_PIECE_ROWS,
            avoid_sorted_gather_mm=backend_ == "cuda"
            and mlx_version in SORTED_GATHER_MM_BROKEN_ON_CUDA,
            dequantize_kv_for_queries=backend_ == "cuda"
            and mlx_version in QUANTIZED_ATTENTION_BROKEN_ON_CUDA,
            layerwise_training=True,
            measured_min_rows=tuple(sorted(measured.items())),
            source=source,
        )

    @classmethod
    def named(cls, name: str) -> FastPaths:
        """The policy `--fast-paths name` asks for (`POLICY_NAMES`)."""
        if name not in POLICY_NAMES:
            raise ValueError(f"--fast-paths must be one of {', '.join(POLICY_NAMES)}, not {name!r}")
        if name == "off":
            return cls.off()
        return cls.default(None if name == "auto" else name)

    def padded_from(self, dtype: mx.Dtype, bits: int | None, group_size: int | None) -> int | None:
        """Routed rows from which experts of `bits` / `group_size` (None: unquantized) take the
        padded kernel on `dtype` rows; None: never."""
        measured = dict(self.measured_min_rows)
        key = thresholds.key(dtype, bits, group_size)
        if key in measured:
            return measured[key]
        if dtype == mx.float32 and not self.padded_float32:
            return None
        return self.padded_min_rows

    def every_expert_rows(
        self, dtype: mx.Dtype, bits: int | None, group_size: int | None
    ) -> int | None:
        """Routed rows from which experts of `bits` / `group_size` run every expert on every
        token for `dtype` rows: measured here where `tune` did, else `every_expert_from`."""
        measured = dict(self.measured_min_rows)
        key = thresholds.key(dtype, bits, group_size, "every expert")
        return measured[key] if key in measured else self.every_expert_from

    def describe(self) -> str:
        """One line for `--verbose`: the experts' thresholds, decode's step and where they came
        from."""
        if self == FastPaths.off():
            return "fast paths off: the plain path (gathered experts, one-graph training step)"
        rows = "never" if self.padded_min_rows is None else f"from {self.padded_min_rows} rows"
        measured = ", ".join(
            f"{k} {'never' if r is None else f'from {r} rows'}" for k, r in self.measured_min_rows
        )
        every = self.every_expert_from
        return (
            f"padded experts {rows}{'' if self.padded_float32 else ' (half precision only)'}"
            f"{f'; measured: {measured}' if measured else ''} [{self.source}]; "
            f"{'' if every is None else f'every expert on every token from {every} rows; '}"
            f"{'decode as one graph; ' if self.decode_graph else ''}"
            f"training {'a layer at a time' if self.layerwise_training else 'in one graph'}"
        )

    @classmethod
    def off(cls) -> FastPaths:
        """The plain path everywhere."""
        return cls()


# Functions that modules compile on first use and keep (each layer's decode step and training
# forward and vjp, the model's decode graph): the kernels a policy chose are traced into them.
COMPILED_FUNCTIONS = ("_decode_fns", "_train_fns", "_decode_graphs")


def set_fast_paths(model: nn.Module, policy: FastPaths) -> None:
    """Give `policy` to every module of `model` that holds one; where that changes a policy, drop
    the functions compiled under the old one, which would keep its kernels."""
    modules = [module for _, module in model.named_modules()]
    changed = False
    for module in modules:
        if hasattr(module, "fast_paths"):
            changed = changed or module.fast_paths != policy
            module.fast_paths = policy
    if changed:
        for module in modules:
            for name in COMPILED_FUNCTIONS:
                if getattr(module, name, None) is not None:
                    setattr(module, name, None)


@contextlib.contextmanager
def using(model: nn.Module, policy: FastPaths) -> Iterator[None]:
    """`model` takes `policy` within the block (`FastPaths.off()` for comparisons)."""
    previous = model.fast_paths
    set_fast_paths(model, policy)
    try:
        yield
    finally:
        set_fast_paths(model, previous)


def compiled_decode_step(
    layer: nn.Module, x: mx.array, cache: Any, mask: mx.array | None = None
) -> tuple[mx.array, Any]:
    """A decoder layer's single-token step, computed as `layer(x, mask, cache)`: its attention
    half (`attention_block`) split around the cache update and attention, which stay outside the
    two compiled functions, then its feed-forward half (`mlp_block`). A batch of sequences
    (mlx-lm's `BatchKVCache`: an offset per sequence, `mask` for their left padding) takes it
    too, so the server's batched decode is compiled like a lone sequence's.

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
    out = attention(queries, keys, values, cache, attn.scale, mask, attn.fast_paths)
    return post(x, out), shared_kv


def attention(
    queries: mx.array, keys: Any, values: Any, cache: Any, scale: float, mask: Any,
    policy: FastPaths,
) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention` (quantized where `cache` is). Under
    `policy.dequantize_kv_for_queries` several queries over a quantized cache attend over its
    keys and values dequantized, with the fused kernel: the same values, for MLX's bug above."""
    if policy.dequantize_kv_for_queries and queries.shape[2] > 1 and hasattr(cache, "bits"):
        keys, values = (
            mx.dequantize(*t, group_size=cache.group_size, bits=cache.bits) for t in (keys, values)
        )
        cache = None
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)


def _decode_pre(layer: nn.Module, x: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
    """Input norm, projections, RoPE and QK-norm: the attention half before the cache."""
    return layer.self_attn.project(layer.input_layernorm(x), offset)


def _decode_post(layer: nn.Module, x: mx.array, attn_out: mx.array) -> mx.array:
    """Output projection and residual (the attention half after attention), then the
    feed-forward half."""
    return layer.mlp_block(x + layer.self_attn.output(attn_out))
