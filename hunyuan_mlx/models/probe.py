"""A short measurement of the experts' kernels on this machine: the routed rows from which
dequantize-and-pad beats gathered `gather_qmm`, and (quantized experts) from which every expert on
every token does, the thresholds `FastPaths.default()` then uses (cached by `thresholds.py`).

When it runs: only when asked (`python -m hunyuan_mlx.tune`), never on load. A load must not take
seconds more, nor dequantize a group of experts beside a model that may already fill the memory,
and the thresholds depend on the bits, group size and dtype, which only the user's checkpoints
tell; without a measurement the built-in thresholds apply, and `--verbose` says which.

The crossover in rows hardly depends on the widths (dequantizing, or every expert, costs
experts x I x D once, the gathered products rows x I x D), so the probe runs A13B's expert count
at reduced widths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import thresholds
from .experts import GatheredGLU
from .fast_paths import FastPaths, set_fast_paths

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
    """The experts the probe runs: A13B's count and top-k, a quarter of its widths."""

    experts: int = 64
    hidden: int = 1024
    intermediate: int = 768
    top_k: int = 8


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


def probe(
    dtype: mx.Dtype,
    bits: int | None,
    group_size: int | None,
    shape: ProbeShape = ProbeShape(),
    kernel: str = "padded",
    reps: int = 3,
) -> tuple[int | None, list[tuple[int, float, float]]]:
    """Time the gathered kernel and `kernel` (`CANDIDATES`) on random experts (`bits`-bit, group
    `group_size`; None: unquantized) and routing in `dtype`; the chosen threshold (`choose`) and
    the timings."""
    candidate, rows = CANDIDATES[kernel]
    mx.random.seed(0)
    glu = GatheredGLU(shape.hidden, shape.intermediate, shape.experts)
    if bits is not None:
        nn.quantize(glu, group_size, bits)
    glu.set_dtype(dtype)
    glu.eval()
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
        wins = wins + 1 if row[2] <= row[1] else 0
        if wins == 2:
            break
    return choose(timings), timings


def tune(
    dtypes: list[mx.Dtype], quantizations: list[tuple[int | None, int | None]], **kw
) -> dict[str, tuple[int | None, list[tuple[int, float, float]]]]:
    """Probe every dtype and (bits, group size), for the padded kernel and (quantized experts)
    every expert on every token, cache the thresholds for this device and MLX version, and return
    them with their timings by `thresholds.key`."""
    found = {
        thresholds.key(dtype, bits, group, kernel): probe(dtype, bits, group, kernel=kernel, **kw)
        for dtype in dtypes
        for bits, group in quantizations
        for kernel in CANDIDATES
        if kernel == "padded" or bits is not None
    }
    thresholds.store({k: threshold for k, (threshold, _) in found.items()})
    return found
