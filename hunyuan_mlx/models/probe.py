"""A short measurement of the experts' kernels on this machine: the routed rows from which
dequantize-and-pad beats gathered `gather_qmm`, and (quantized experts) from which every expert on
every token does, the thresholds `FastPaths.default()` then uses (cached by `thresholds.py`); and
whether greedy decode runs faster with the whole model's step as one compiled graph than with each
layer's compiled step (`decode.py`).

When it runs: only when asked (`python -m hunyuan_mlx.tune`), never on load. A load must not take
seconds more, nor dequantize a group of experts beside a model that may already fill the memory,
and the thresholds depend on the bits, group size and dtype, which only the user's checkpoints
tell; without a measurement the built-in thresholds apply, and `--verbose` says which.

On a GPU the experts probe runs one A13B layer's experts (64 of 4096 x 3072, top-8; 4-bit, about
1.4 GB). At a quarter of those widths an H100's kernels took about 0.5 ms a call whatever the rows,
a fixed cost that moved the padded kernel's crossover to 2,048 rows, where `benchmarks.profile_moe`
at A13B's widths puts it at 512 (BENCHMARKS.md). The CPU computes at one slow rate whatever a
product's size, so it keeps a quarter of the widths: its probes took 8.5 minutes on a 2-core CPU,
and A13B's widths are 16 times the computation.

Decode's choice is one of host time (graph nodes, which follow the layers, heads and experts)
against the graph's attention over a whole buffer (a mask where a backend's single-token kernel
takes one, else several nodes a layer): the probe runs A13B's layers, heads and experts at narrow
widths.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step

from . import thresholds
from .config import HunYuanMoEV1Config
from .experts import GatheredGLU, GatheredLinear, QuantizedGatheredLinear
from .fast_paths import FastPaths, backend, set_fast_paths
from .hunyuan import HunYuanMoEV1ForCausalLM
from .quantization import apply_quantization

# Hears each timing of a probe as it is measured: (rows or round, gathered or layer ms,
# candidate or graph ms).
Report = Callable[[tuple[int, float, float]], None]
# Routed rows (tokens x k) measured, in order; the probe stops once the candidate kernel has won
# at two in a row (it only gets better with more rows).
PROBE_ROWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Every expert on every token is for a batch's decode: 1 to 64 tokens of top-8.
EVERY_EXPERT_PROBE_ROWS = (8, 16, 32, 64, 128, 256, 512)
# Each kernel the probe compares with the gathered one, as the policy that takes it from 1 row.
CANDIDATES = {
    "padded": (FastPaths(padded_min_rows=1), PROBE_ROWS),
    "every expert": (FastPaths(every_expert_from=1), EVERY_EXPERT_PROBE_ROWS),
}


@dataclass(frozen=True)
class ProbeShape:
    """The experts the probe runs: one A13B layer's."""

    experts: int = 64
    hidden: int = 4096
    intermediate: int = 3072
    top_k: int = 8

    @classmethod
    def here(cls) -> ProbeShape:
        """The shape for this machine: A13B's on a GPU, a quarter of its widths on the CPU."""
        return cls(hidden=1024, intermediate=768) if backend() == "cpu" else cls()


@dataclass(frozen=True)
class DecodeProbeShape:
    """The model the decode probe runs: A13B's layers (and its heads, experts and top-k, from
    `ProbeShape`) at narrow widths: about 0.5 GB at its peak while built (4-bit)."""

    layers: int = 32
    hidden: int = 512
    intermediate: int = 128
    vocab: int = 4096


# The decode probe's greedy run in each round: a prompt, then tokens after the first few (the
# first after a policy change traces its step anew), timed one by one.
DECODE_PROMPT_TOKENS = 128
DECODE_UNTIMED_TOKENS = 4
DECODE_TIMED_TOKENS = 24
DECODE_ROUNDS = 3  # interleaved: the two steps alternate, so drift hits both


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of `fn()` evaluated, after one untimed call (compilation)."""
    mx.eval(fn())
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - tic) * 1e3)
    return sorted(times)[len(times) // 2]


def choose(timings: list[tuple[int, float, float]]) -> int | None:
    """The threshold from (rows, gathered ms, candidate ms) in increasing rows: the first row
    count from which the candidate kernel was never slower; None where it lost at the largest."""
    threshold = None
    for rows, gathered, candidate in timings:
        if candidate <= gathered:
            threshold = rows if threshold is None else threshold
        else:
            threshold = None
    return threshold


def random_experts(
    shape: ProbeShape, bits: int | None, group_size: int | None, dtype: mx.Dtype
) -> GatheredGLU:
    """Random experts of `shape` in eval mode, `bits`-bit (None: unquantized), for timing only:
    quantized, every expert is a copy of the first, so that only the quantized arrays are ever
    whole in memory (A13B's layer in float32 would take 9.7 GB before quantizing)."""
    glu = GatheredGLU(shape.hidden, shape.intermediate, shape.experts)
    if bits is not None:
        for name in ("gate_up_proj", "down_proj"):
            _, output_dims, input_dims = getattr(glu, name).dims
            first = GatheredLinear(input_dims, output_dims, 1).weight
            one = QuantizedGatheredLinear(first, group_size, bits)
            for key, array in one.parameters().items():
                # Copies, not a broadcast view: each expert's own memory, read as a model's is.
                one[key] = mx.contiguous(mx.repeat(array, shape.experts, axis=0))
            setattr(glu, name, one)
    glu.set_dtype(dtype)
    glu.eval()
    mx.eval(glu.parameters())
    return glu


def probe(
    dtype: mx.Dtype,
    bits: int | None,
    group_size: int | None,
    shape: ProbeShape | None = None,
    kernel: str = "padded",
    reps: int = 3,
    report: Report | None = None,
) -> tuple[int | None, list[tuple[int, float, float]]]:
    """Time the gathered kernel and `kernel` (`CANDIDATES`) on random experts (`bits`-bit, group
    `group_size`; None: unquantized) and routing in `dtype`; the chosen threshold (`choose`) and
    the timings, each also given to `report` as it is measured. `shape` defaults to
    `ProbeShape.here()`."""
    shape = shape or ProbeShape.here()
    candidate, rows = CANDIDATES[kernel]
    mx.random.seed(0)
    glu = random_experts(shape, bits, group_size, dtype)
    timings, wins = [], 0
    for n in rows:
        tokens = max(1, n // shape.top_k)
        x = mx.random.normal((1, tokens, shape.hidden)).astype(dtype)
        logits = mx.random.uniform(shape=(1, tokens, shape.experts))
        indices = mx.argsort(logits, axis=-1)[..., : shape.top_k]
        weights = mx.softmax(mx.random.normal(indices.shape), axis=-1)
        row = [n]
        for policy in (FastPaths(), candidate):
            set_fast_paths(glu, policy)
            call = lambda x=x, i=indices, w=weights: glu(x, i, w)  # noqa: E731
            row.append(round(median_ms(call, reps), 3))
        timings.append(tuple(row))
        if report:
            report(timings[-1])
        wins = wins + 1 if row[2] <= row[1] else 0
        if wins == 2:
            break
    return choose(timings), timings


def ms_per_token(model: nn.Module, prompt: mx.array) -> float:
    """Median milliseconds between greedy tokens of mlx-lm's generation loop after `prompt`,
    leaving out the first `DECODE_UNTIMED_TOKENS`."""
    times = []
    steps = generate_step(prompt, model, max_tokens=DECODE_UNTIMED_TOKENS + DECODE_TIMED_TOKENS)
    for _ in steps:  # each token is read back (`item`): the time between them is a token's
        times.append(time.perf_counter())
    timed = times[DECODE_UNTIMED_TOKENS:]
    return statistics.median(b - a for a, b in zip(timed, timed[1:])) * 1e3


def decode_probe(
    dtype: mx.Dtype,
    bits: int | None,
    group_size: int | None,
    shape: ProbeShape = ProbeShape(),
    decode_shape: DecodeProbeShape = DecodeProbeShape(),
    report: Report | None = None,
) -> tuple[int | None, list[tuple[int, float, float]]]:
    """Greedy decode on a random model (`decode_shape`, `bits`-bit, weights in `dtype`) with each
    layer's compiled step and with the whole model's graph, in `DECODE_ROUNDS` interleaved rounds:
    1 if the graph's median ms a token was lower (the cache's value: take it), else None; and
    each round's (round, layer ms, graph ms), also given to `report` as it is measured."""
    mx.random.seed(0)
    config = HunYuanMoEV1Config(
        vocab_size=decode_shape.vocab,
        hidden_size=decode_shape.hidden,
        intermediate_size=decode_shape.intermediate,
        num_hidden_layers=decode_shape.layers,
        num_attention_heads=32,  # A13B's heads: the graph's attention nodes are per head group
        num_key_value_heads=8,
        head_dim=128,
        num_experts=shape.experts,
        moe_topk=shape.top_k,
        max_position_embeddings=DECODE_PROMPT_TOKENS + 2 * DECODE_TIMED_TOKENS,
        tie_word_embeddings=True,
    )
    model = HunYuanMoEV1ForCausalLM(config)
    if bits is not None:
        apply_quantization(model, {"bits": bits, "group_size": group_size, "mode": "affine"})
    model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, decode_shape.vocab, (DECODE_PROMPT_TOKENS,))
    policy = FastPaths.default()
    timings = []
    for round_ in range(1, DECODE_ROUNDS + 1):
        row = [round_]
        for graph in (False, True):
            set_fast_paths(model, replace(policy, decode_graph=graph))
            row.append(round(ms_per_token(model, prompt), 3))
        timings.append(tuple(row))
        if report:
            report(timings[-1])
    layer, graph = (statistics.median(t[i] for t in timings) for i in (1, 2))
    return (1 if graph < layer else None), timings


def tune(
    dtypes: list[mx.Dtype],
    quantizations: list[tuple[int | None, int | None]],
    shape: ProbeShape | None = None,
    decode_shape: DecodeProbeShape = DecodeProbeShape(),
    decode_dtype: mx.Dtype | None = None,
    report: Callable[[str, tuple[int, float, float]], None] | None = None,
) -> dict[str, tuple[int | None, list[tuple[int, float, float]]]]:
    """Probe every dtype and (bits, group size), for the padded kernel and (quantized experts)
    every expert on every token, on experts of `shape` (default `ProbeShape.here()`), and decode
    (in `decode_dtype`, default the first dtype, and the first quantization); cache the results
    for this device and MLX version, and return them with their timings by `thresholds.key` (and
    `thresholds.DECODE_GRAPH`). `report(key, timing)` hears each timing as it is measured: the
    probes take minutes on a slow machine."""
    shape = shape or ProbeShape.here()

    def reporter(key: str) -> Report | None:
        return partial(report, key) if report else None

    found = {}
    for dtype in dtypes:
        for bits, group in quantizations:
            for kernel in CANDIDATES:
                if kernel == "padded" or bits is not None:
                    key = thresholds.key(dtype, bits, group, kernel)
                    found[key] = probe(dtype, bits, group, shape, kernel, report=reporter(key))
    bits, group = quantizations[0]
    decode_dtype = decode_dtype or dtypes[0]
    key = thresholds.DECODE_GRAPH
    found[key] = decode_probe(decode_dtype, bits, group, shape, decode_shape, reporter(key))
    thresholds.store({k: threshold for k, (threshold, _) in found.items()})
    return found
