"""The mixture-of-experts block: float32 router, top-k, renormalised weights, gathered experts.

Routing (`HunYuanMoEV1Moe`) is kept apart from expert compute (`GatheredGLU`), which applies
each token's k experts with one gathered matmul per projection over stacked expert weights
(`mx.gather_mm`, or `mx.gather_qmm` once quantized) instead of looping over experts. No token is
ever dropped.

Fast paths (inference only; `fast_paths(False)` turns them off, and tests hold them equal to the
plain path): long prefill chunks run the experts as padded batched matmuls on weights dequantized
once per call (`GatheredGLU.padded`); single-token steps are compiled (`model.py`). Decode is
bound by host time per graph node, so the few-row path is written for few nodes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import HunYuanMoEV1Config

# Sorting tokens by expert costs two argsorts and a gather; it pays off once a call routes enough
# rows that experts repeat, and lets gather_(q)mm read each expert's weights once. mlx-lm's value.
SORT_THRESHOLD = 64


def gather_sort(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Repeat each token once per chosen expert and order the rows by expert.

    `x` is (..., 1, 1, D) and `indices` (..., k); returns the sorted rows (N*k, 1, D), their expert
    ids (N*k,), and the permutation that puts the rows back (see `scatter_unsort`).
    """
    k = indices.shape[-1]
    indices = indices.flatten()
    order = mx.argsort(indices)
    inverse_order = mx.argsort(order)
    return x.flatten(0, -3)[order // k], indices[order], inverse_order


def scatter_unsort(x: mx.array, inverse_order: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Undo `gather_sort`: rows (N*k, 1, D) back in token order, as `shape` (..., k) + (D,)."""
    return mx.unflatten(x.squeeze(-2)[inverse_order], 0, shape)


def weighted_sum(out: mx.array, weights: mx.array) -> mx.array:
    """Each token's expert outputs (..., k, D) summed with their float32 weights (..., k)."""
    return (out * weights[..., None]).sum(axis=-2).astype(out.dtype)


class GatheredLinear(nn.Module):
    """`num_experts` bias-free linear layers stored as one (E, out, in) array, applied per row."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(
        self,
        x: mx.array,
        indices: mx.array,
        sorted_indices: bool = False,
        lhs_indices: mx.array | None = None,
    ) -> mx.array:
        """Row r of x's batch (`lhs_indices`, default: broadcast) times expert `indices[r]`."""
        weight = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and backend() == "cpu":
            # MLX's CPU backend has gather_mm for float32 only; GPUs take every float type.
            out = mx.gather_mm(
                x.astype(mx.float32),
                weight.astype(mx.float32),
                lhs_indices,
                indices,
                sorted_indices=sorted_indices,
            )
            return out.astype(x.dtype)
        return mx.gather_mm(x, weight, lhs_indices, indices, sorted_indices=sorted_indices)

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine"
    ) -> QuantizedGatheredLinear:
        """Called by `nn.quantize`: the same experts, quantized."""
        return QuantizedGatheredLinear(self.weight, group_size, bits, mode)


class QuantizedGatheredLinear(nn.Module):
    """`GatheredLinear` with quantized weights, applied with `mx.gather_qmm`."""

    def __init__(
        self,
        weight: mx.array,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ):
        """Quantize (E, out, in) `weight`; None group size or bits take the mode's defaults."""
        super().__init__()
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        # Record what mx.quantize chose, which gather_qmm needs back.
        self.group_size = group_size or weight.shape[-1] // self.scales.shape[-1]
        self.bits = bits or self.weight.shape[-1] * 32 // weight.shape[-1]
        self.mode = mode
        if biases:  # only the affine mode has biases
            self.biases = biases[0]
        self.freeze()

    def __call__(
        self,
        x: mx.array,
        indices: mx.array,
        sorted_indices: bool = False,
        lhs_indices: mx.array | None = None,
    ) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            lhs_indices=lhs_indices,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


# ---------------------------------------------------------------------------------------------
# Prefill fast path: the routed experts as one padded batched matmul per projection.
#
# Profiled on an H100 (MLX 0.32.4 CUDA, A13B shape, 4-bit g64; BENCHMARKS.md): for 512 tokens x
# top-8, sorted `gather_qmm` of the fused gate+up experts takes 43 ms (4.7 TFLOP/s); dequantizing
# the layer's experts (3.5 ms) and one batched `matmul` over (experts, capacity, D) rows takes
# 1.9 ms (108 TFLOP/s; 240 at 2048 tokens), with identical bf16 output. (`gather_mm` on dense
# weights is no way out there: it returned wrong rows or NaN.) The capacity (most rows any one
# expert got) is read on the host, one synchronisation per layer, so no token is ever dropped;
# padding rows repeat a real token and are never read back.

_fast_paths_enabled = True

# Routed rows (tokens x k) from which a call takes the padded path, by backend; None: never.
# Measured (BENCHMARKS.md): on CUDA, dequantizing a layer's experts costs about what gather_qmm
# spends on ~350 rows; on the CPU, whose bf16 gather_qmm is far slower, the padded path wins from
# a few dozen rows. Apple GPUs keep sorted gather_qmm until measured there.
PADDED_MIN_ROWS = {"cuda": 512, "cpu": 64, "metal": None}
# Experts per batched matmul: bounds the dense weights alive at once (32 of A13B's experts: 1.6 GB
# of bf16 gate+up, 0.8 GB of down) to keep prefill's peak memory within 10% of the weights.
PADDED_EXPERT_GROUP = 32


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Turn the fast paths on or off within a block (off: the plain path, for comparisons)."""
    global _fast_paths_enabled
    previous, _fast_paths_enabled = _fast_paths_enabled, enabled
    try:
        yield
    finally:
        _fast_paths_enabled = previous


def fast_paths_enabled() -> bool:
    return _fast_paths_enabled


def backend() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def padded_min_rows() -> int | None:
    return PADDED_MIN_ROWS.get(backend()) if _fast_paths_enabled else None


def has_dense_weight(proj: nn.Module) -> bool:
    """A plain or quantized gathered linear (an adapter wrapping one must see its own call)."""
    return type(proj) in (GatheredLinear, QuantizedGatheredLinear)


def dense_expert_weight(proj: nn.Module, experts: list[int] | None = None) -> mx.array:
    """(E, out, in) weights of a plain or quantized gathered linear, of `experts` only if given."""
    contiguous = experts is not None and experts[-1] - experts[0] == len(experts) - 1
    index = None if experts is None else mx.array(experts, dtype=mx.int32)

    def pick(a: mx.array | None) -> mx.array | None:
        if a is None or experts is None:
            return a
        # A run of experts is a view; others are gathered (a copy of their packed weights).
        return a[experts[0] : experts[-1] + 1] if contiguous else mx.take(a, index, axis=0)

    if type(proj) is GatheredLinear:
        return pick(proj.weight)
    return mx.dequantize(
        pick(proj.weight),
        pick(proj.scales),
        pick(proj.get("biases")),
        group_size=proj.group_size,
        bits=proj.bits,
        mode=proj.mode,
    )


class GatheredGLU(nn.Module):
    """Stacked SwiGLU experts: `down(silu(gate(x)) * up(x))` with gate and up fused in one matmul.

    `gate_up_proj` is (E, 2 * I, D), gate rows first, as transformers' `experts.gate_up_proj`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = GatheredLinear(hidden_size, 2 * intermediate_size, num_experts)
        self.down_proj = GatheredLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (..., D), expert ids and weights (..., k) -> the weighted sum of the chosen experts'
        outputs, (..., D)."""
        limit = padded_min_rows()
        rows = indices.size
        if not self.training and (
            (limit is not None and rows >= limit)
            or (rows >= SORT_THRESHOLD and self.sorted_gather_mm_unsafe())
        ):
            out = self.padded(x, indices)
            if out is not None:
                return weighted_sum(out, weights)
        indices = mx.stop_gradient(indices)
        if rows >= SORT_THRESHOLD:
            x_rows, row_indices, inverse_order = gather_sort(mx.expand_dims(x, (-2, -3)), indices)
            out = self.glu(x_rows, row_indices, sorted_indices=True)
            return weighted_sum(scatter_unsort(out, inverse_order, indices.shape), weights)
        # Few rows (decode). Every graph node costs host time here, so: row indices as constants
        # rather than the arange gather_qmm would build, the weights folded into the down
        # projection's input (it is linear), and one sum over the (k, 1) rows of each token.
        k = indices.shape[-1]
        token_rows = np.arange(rows // k, dtype=np.uint32).repeat(k).reshape(indices.shape)
        choice_rows = np.arange(rows, dtype=np.uint32).reshape(indices.shape)
        out = self.glu(
            mx.expand_dims(x, -2),
            indices,
            lhs_indices=(mx.array(token_rows), mx.array(choice_rows)),
            scale=weights[..., None, None].astype(x.dtype),
        )
        return out.sum(axis=(-3, -2))

    def glu(
        self,
        x: mx.array,
        indices: mx.array,
        sorted_indices: bool = False,
        lhs_indices: tuple[mx.array | None, mx.array | None] = (None, None),
        scale: mx.array | None = None,
    ) -> mx.array:
        """The experts on gathered rows, (..., 1, D) out. `lhs_indices` pick each projection's
        input rows (default: broadcast); `scale` multiplies the down projection's input."""
        gate, up = mx.split(
            self.gate_up_proj(x, indices, sorted_indices, lhs_indices[0]),
            [self.intermediate_size],
            axis=-1,
        )
        h = nn.silu(gate) * up
        if scale is not None:
            h = h * scale
        return self.down_proj(h, indices, sorted_indices, lhs_indices[1])

    def sorted_gather_mm_unsafe(self) -> bool:
        """Unquantized experts on CUDA: MLX 0.32.4's sorted `gather_mm` there returned NaN or
        wrong rows at A13B shape and hit an illegal memory access at 320 rows (BENCHMARKS.md),
        so such calls take the padded path (no dequantization needed) whatever `fast_paths` says.
        """
        return (
            backend() == "cuda"
            and type(self.gate_up_proj) is GatheredLinear
            and type(self.down_proj) is GatheredLinear
        )

    def padded(self, x: mx.array, indices: mx.array) -> mx.array | None:
        """The same result as batched matmuls over (used experts, capacity, D) rows.

        None where this path does not apply: wrapped projections (adapters), or inside a
        function transformation (`mx.compile`), where the host cannot read the expert counts.
        """
        if not (has_dense_weight(self.gate_up_proj) and has_dense_weight(self.down_proj)):
            return None
        num_experts = self.gate_up_proj.weight.shape[0]
        k = indices.shape[-1]
        flat = mx.stop_gradient(indices).flatten().astype(mx.int32)
        try:
            counts = mx.zeros((num_experts,), dtype=mx.int32).at[flat].add(1).tolist()
        except ValueError:  # "eval during function transformations"
            return None
        used = [e for e, c in enumerate(counts) if c]
        capacity = -(-max(counts) // 8) * 8  # a multiple of 8: fewer distinct matmul shapes
        compact_of, starts, total = [0] * num_experts, [], 0
        for j, e in enumerate(used):
            compact_of[e], total = j, total + counts[e]
            starts.append(total - counts[e])
        compact = mx.array(compact_of, dtype=mx.int32)[flat]  # each row's expert, 0..used-1
        starts_a = mx.array(starts, dtype=mx.int32)
        counts_a = mx.array([counts[e] for e in used], dtype=mx.int32)
        order = mx.argsort(compact)  # sorted position -> row
        # Each row's slot in the (used, capacity) grid: its expert's block, then its rank there.
        slot = compact * capacity + (mx.argsort(order).astype(mx.int32) - starts_a[compact])
        # Each grid slot's token; padding slots repeat the row at the block start.
        c = mx.arange(capacity, dtype=mx.int32)
        src = starts_a[:, None] + mx.where(c < counts_a[:, None], c, 0)
        tokens = (order // k)[src]
        rows = x.reshape(-1, x.shape[-1])[tokens]  # (used, capacity, D)
        # At most PADDED_EXPERT_GROUP experts' dense weights exist at a time.
        outs = []
        for a in range(0, len(used), PADDED_EXPERT_GROUP):
            b = min(a + PADDED_EXPERT_GROUP, len(used))
            group = None if b - a == num_experts else used[a:b]
            h = rows[a:b] @ dense_expert_weight(self.gate_up_proj, group).swapaxes(-1, -2)
            gate, up = mx.split(h, [self.intermediate_size], axis=-1)
            down = dense_expert_weight(self.down_proj, group).swapaxes(-1, -2)
            outs.append((nn.silu(gate) * up) @ down)
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        out = out.reshape(-1, out.shape[-1])[slot]
        return out.reshape(*indices.shape, out.shape[-1])


class HunYuanMoEV1MLP(nn.Module):
    """The dense SwiGLU MLP (the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class HunYuanMoEV1Gate(nn.Module):
    """The router. Its weight stays float32, never quantized: small logit errors flip top-k."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.wg.weight = self.wg.weight.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wg(x.astype(mx.float32))


class HunYuanMoEV1Moe(nn.Module):
    """Routed experts plus the shared MLP. One expert makes it a dense MLP with no router."""

    def __init__(self, config: HunYuanMoEV1Config, layer_idx: int):
        super().__init__()
        self.num_experts = config.layer_num_experts(layer_idx)
        self.top_k = config.layer_moe_topk(layer_idx)
        self.norm_topk_prob = config.norm_topk_prob
        if self.num_experts > 1:
            self.gate = HunYuanMoEV1Gate(config.hidden_size, self.num_experts)
        self.experts = GatheredGLU(
            config.hidden_size, config.layer_moe_intermediate_size(layer_idx), self.num_experts
        )
        num_shared = config.layer_num_shared_expert(layer_idx)
        if config.use_mixed_mlp_moe and num_shared > 0:
            self.shared_mlp = HunYuanMoEV1MLP(
                config.hidden_size, config.intermediate_size * num_shared
            )

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Top-k expert ids and their float32 weights, (..., k) each."""
        logits = self.gate(x)
        k = self.top_k
        # Softmax is monotonic: the top-k logits are the top-k probabilities.
        indices = mx.stop_gradient(mx.argpartition(logits, kth=-k, axis=-1)[..., -k:])
        if self.norm_topk_prob:
            # Unlike mlx-lm's hunyuan.py, renormalise as the reference does. Renormalised top-k
            # probabilities are exactly the softmax of the top-k logits (the full softmax's
            # denominator cancels): one small softmax instead of a full one, a sum and a divide.
            return indices, mx.softmax(
                mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True
            )
        probs = mx.softmax(logits, axis=-1, precise=True)
        return indices, mx.take_along_axis(probs, indices, axis=-1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.num_experts == 1:
            # Softmax over one expert is 1: every token goes to expert 0 with weight 1.
            indices = mx.zeros((*x.shape[:-1], 1), dtype=mx.uint32)
            weights = mx.ones(indices.shape, dtype=mx.float32)
        else:
            indices, weights = self.route(x)
        y = self.experts(x, indices, weights)
        if "shared_mlp" in self:
            y = y + self.shared_mlp(x)
        return y
