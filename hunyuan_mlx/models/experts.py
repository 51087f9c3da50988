"""Gathered experts: `num_experts` linears stored as one stacked array, applied per routed row.

`GatheredGLU` applies each token's k SwiGLU experts with one of three kernels, which it picks itself
(`GatheredGLU.kernel`, from the model's `FastPaths` policy), so that the MoE block just calls it:

- **gathered** (the plain path, the one the transformers parity tests pin): one gathered matmul
  per projection (`mx.gather_mm`, or `mx.gather_qmm` once quantized) instead of a loop over
  experts, so no token is ever dropped;
- **padded** (long prefill chunks and training): the routed rows laid out in a padded grid of
  blocks, one expert's each, run as one batched matmul per projection on weights dequantized a
  group of experts at a time; tests hold it equal to the gathered kernel;
- **every expert** (a batch's decode on CUDA): every expert on every token, scaled by the routing
  weights, zero where not chosen: each expert's weights read once for all the call's tokens (in a
  call of fewer routed rows than experts, only as many experts, those it routes to among them).

A long call goes in parts, each run before the next is built: the padded kernel's expert groups
(`PaddedGrid`), or the gathered kernel's pieces of whole tokens (`TokenPieces`).

Routing lives in the MoE block (`hunyuan.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .fast_paths import FastPaths
from .quantization import DEFAULT_Q_MODE, dequantize

Rows = mx.array | None  # which of x's rows each gathered product reads (None: broadcast)
# A part of one experts call that is run on its own: its slice of the call's rows, and the
# function from those rows to its outputs (`PaddedGrid.parts`, `TokenPieces.parts`).
Part = tuple[slice, Callable[[mx.array], mx.array]]

# Sorting rows by expert costs two argsorts and a gather; it pays off once a call routes enough
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


def call_experts(indices: mx.array, num_experts: int) -> mx.array:
    """The experts `every_expert` runs for routing `indices` (..., k): all of them in order, or,
    where the call routes fewer rows than there are experts, that many, every expert it routes
    to among them (the rest unused, weighted zero). A fixed count, so the step compiles, and no
    host read of which experts are used."""
    every = mx.array(np.arange(num_experts, dtype=np.uint32))
    if indices.size >= num_experts:
        return every
    used = (indices.reshape(-1, 1) == every).any(axis=0)
    return mx.argsort(mx.logical_not(used).astype(mx.uint32))[: indices.size].astype(mx.uint32)


@cache
def gather_mm_supports(dtype: mx.Dtype, device: mx.Device) -> bool:
    """Whether `mx.gather_mm` runs in `dtype` on `device`, found by running it once.

    MLX 0.32.4's CPU backend takes float32 only; asking beats a version list that goes stale.
    """
    x, w = mx.zeros((1, 1, 2), dtype=dtype), mx.zeros((1, 2, 2), dtype=dtype)
    try:
        mx.eval(mx.gather_mm(x, w, None, mx.zeros((1,), dtype=mx.uint32), stream=device))
    except (ValueError, RuntimeError):
        return False
    return True


def pick_experts(a: mx.array | None, experts: list[int] | None) -> mx.array | None:
    """The rows of a stacked (E, ...) array for `experts` (all for None; repeats allowed): a view
    for a run of consecutive experts, a gathered copy otherwise."""
    if a is None or experts is None:
        return a
    if experts == list(range(experts[0], experts[0] + len(experts))):
        return a[experts[0] : experts[0] + len(experts)]
    return mx.take(a, mx.array(experts, dtype=mx.int32), axis=0)


@cache
def frozen_dequantized_matmul(group_size: int, bits: int, mode: str) -> Callable[..., mx.array]:
    """`f(x, weight, scales[, biases])`: x (n, rows, in) times the transpose of the dequantized
    quantized experts (n, out, in), batched over n, for weights that are never trained.

    Its backward dequantizes the weights again rather than keep them: autograd would hold each
    layer's dense experts (3.2 GB of bf16 gate+up at A13B shape) from the forward to the backward.
    """
    params = {"group_size": group_size, "bits": bits, "mode": mode}

    def dense(quantized: tuple[mx.array, ...]) -> mx.array:
        weight, scales, *biases = quantized
        return dequantize(weight, scales, biases[0] if biases else None, params)

    @mx.custom_function
    def matmul(x: mx.array, *quantized: mx.array) -> mx.array:
        return x @ dense(quantized).swapaxes(-1, -2)

    @matmul.vjp
    def matmul_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        x, *quantized = primals
        # Zero cotangents for the quantized arrays: frozen, never asked for, never evaluated.
        return (cotangent @ dense(quantized), *(mx.zeros_like(q) for q in quantized))

    return matmul


class GatheredLinear(nn.Module):
    """`num_experts` bias-free linear layers stored as one (E, out, in) array, applied per row."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(
        self, x: mx.array, indices: mx.array, sorted_indices: bool = False, lhs_indices: Rows = None
    ) -> mx.array:
        """Row r of x's batch (`lhs_indices`, default: broadcast) times expert `indices[r]`."""
        weight = self.weight.swapaxes(-1, -2)
        if not gather_mm_supports(x.dtype, mx.default_device()):
            out = mx.gather_mm(
                x.astype(mx.float32),
                weight.astype(mx.float32),
                lhs_indices,
                indices,
                sorted_indices=sorted_indices,
            )
            return out.astype(x.dtype)
        return mx.gather_mm(x, weight, lhs_indices, indices, sorted_indices=sorted_indices)

    @classmethod
    def from_weight(cls, weight: mx.array) -> GatheredLinear:
        """The gathered linear holding the (E, out, in) `weight` (the random init is never run)."""
        num_experts, output_dims, input_dims = weight.shape
        linear = cls(input_dims, output_dims, num_experts)
        linear.weight = weight
        return linear

    @property
    def dims(self) -> tuple[int, int, int]:
        """(num_experts, output_dims, input_dims)."""
        return tuple(self.weight.shape)

    def dense_weight(self, experts: list[int] | None = None) -> mx.array:
        """The (E, out, in) weights, of `experts` only if given."""
        return pick_experts(self.weight, experts)

    def batched(self, x: mx.array, experts: list[int] | None = None) -> mx.array:
        """x (n, rows, in) through expert `experts[j]` for x[j] (all experts in order for None):
        the padded path's product."""
        return x @ self.dense_weight(experts).swapaxes(-1, -2)

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = DEFAULT_Q_MODE
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
        mode: str = DEFAULT_Q_MODE,
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
        self, x: mx.array, indices: mx.array, sorted_indices: bool = False, lhs_indices: Rows = None
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

    @property
    def dims(self) -> tuple[int, int, int]:
        """(num_experts, output_dims, input_dims), the last unpacked."""
        num_experts, output_dims, packed = self.weight.shape
        return num_experts, output_dims, packed * 32 // self.bits

    def dense_weight(self, experts: list[int] | None = None) -> mx.array:
        """The dequantized (E, out, in) weights, of `experts` only if given."""
        return dequantize(
            pick_experts(self.weight, experts),
            pick_experts(self.scales, experts),
            pick_experts(self.get("biases"), experts),
            {"group_size": self.group_size, "bits": self.bits, "mode": self.mode},
        )

    def batched(self, x: mx.array, experts: list[int] | None = None) -> mx.array:
        """`GatheredLinear.batched`, dequantizing only the experts asked for, forward and back."""
        quantized = [pick_experts(self.get(k), experts) for k in ("weight", "scales", "biases")]
        matmul = frozen_dequantized_matmul(self.group_size, self.bits, self.mode)
        return matmul(x, *(q for q in quantized if q is not None))


GATHERED_LINEARS = (GatheredLinear, QuantizedGatheredLinear)


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

    def parts(self, experts: GatheredGLU) -> list[Part]:
        """The groups of `experts.expert_group` blocks: each one's slice of `rows` and its
        function."""
        groups = self.groups(experts.expert_group)
        return [(part, partial(padded_glu, experts, group=group)) for part, group in groups]

    def unpad(self, outs: list[mx.array]) -> mx.array:
        """Each routed row's output (..., k, D) from the groups' outputs, in grid order."""
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        out = out.reshape(-1, out.shape[-1])[self.cells]
        return out.reshape(*self.shape, out.shape[-1])


@dataclass(frozen=True)
class TokenPieces:
    """One call's tokens in pieces of whole tokens, about `rows` routed rows each, for the
    gathered kernel run a piece at a time: `PaddedGrid`'s interface (rows, parts, unpad), so
    the trainer splits either kernel's call alike (`tuner/expert_groups.py`)."""

    indices: mx.array  # (tokens, k): each token's experts
    step: int  # tokens per piece
    shape: tuple[int, ...]  # the routing's (..., k)

    @classmethod
    def plan(cls, indices: mx.array, rows: int) -> TokenPieces:
        """Pieces of routing `indices` (..., k), each about `rows` routed rows."""
        k = indices.shape[-1]
        return cls(indices.reshape(-1, k), max(rows // k, 1), tuple(indices.shape))

    @property
    def slices(self) -> list[slice]:
        """Each piece's tokens."""
        tokens = len(self.indices)
        return [slice(a, a + self.step) for a in range(0, tokens, self.step)]

    def rows(self, x: mx.array) -> mx.array:
        """The tokens' rows (tokens, D) from `x` (..., D)."""
        return x.reshape(-1, x.shape[-1])

    def parts(self, experts: GatheredGLU) -> list[Part]:
        """Each piece's slice of `rows` and its function: its tokens' routed outputs (n, k, D)."""
        return [(part, partial(experts.routed, indices=self.indices[part])) for part in self.slices]

    def unpad(self, outs: list[mx.array]) -> mx.array:
        """Each routed row's output (..., k, D) from the pieces' outputs."""
        out = mx.concatenate(outs)
        return out.reshape(*self.shape, out.shape[-1])


def padded_glu(experts: GatheredGLU, rows: mx.array, group: list[int] | None) -> mx.array:
    """The experts on one group's padded rows (n, capacity, D): block j through `group[j]`."""
    h = experts.gate_up_proj.batched(rows, group)
    gate, up = mx.split(h, [experts.intermediate_size], axis=-1)
    return experts.down_proj.batched(nn.silu(gate) * up, group)


class GatheredGLU(nn.Module):
    """Stacked SwiGLU experts: `down(silu(gate(x)) * up(x))` with gate and up fused in one matmul.

    `gate_up_proj` is (E, 2 * I, D), gate rows first, as transformers' `experts.gate_up_proj`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = GatheredLinear(hidden_size, 2 * intermediate_size, num_experts)
        self.down_proj = GatheredLinear(intermediate_size, hidden_size, num_experts)
        # The policy the kernel is chosen by; the model gives its own (`set_fast_paths`).
        self.fast_paths = FastPaths.off()

    def kernel(self, rows: int, dtype: mx.Dtype) -> str:
        """"padded", "every expert" or "gathered": the kernel a call on `rows` routed rows in
        `dtype` runs.

        Padded where the policy pads `dtype` from `rows` on, or keeps unquantized experts off
        MLX's broken sorted `gather_mm` (which sorts from `SORT_THRESHOLD` rows); never where a
        projection lacks the padded product `batched` (LoRA adapters add theirs): a foreign
        wrapper sees its own call. Inside `mx.compile` a padded call runs gathered. Every
        expert on every token where the policy says so from `rows` on, in inference, on quantized
        experts not wrapped: what was measured.
        """
        policy = self.fast_paths
        projections = (self.gate_up_proj, self.down_proj)
        if not all(hasattr(p, "batched") for p in projections):
            return "gathered"
        start = self.padded_from(dtype)
        if start is not None and rows >= start:
            return "padded"
        every = policy.every_expert_rows(dtype, *self.quantization)
        if every is not None and rows >= every and not self.training:
            if all(type(p) is QuantizedGatheredLinear for p in projections):
                return "every expert"
        unquantized = all(type(p) is GatheredLinear for p in projections)
        if policy.avoid_sorted_gather_mm and rows >= SORT_THRESHOLD and unquantized:
            return "padded"
        return "gathered"

    def padded_from(self, dtype: mx.Dtype) -> int | None:
        """Routed rows from which calls in `dtype` take the padded kernel; None: never."""
        return self.fast_paths.padded_from(dtype, *self.quantization)

    @property
    def quantization(self) -> tuple[int | None, int | None]:
        """The experts' (bits, group size); (None, None) unquantized."""
        proj = self.gate_up_proj
        proj = getattr(proj, "linear", proj)  # under an adapter, its base's
        return getattr(proj, "bits", None), getattr(proj, "group_size", None)

    def reads_routing_counts(self, dtype: mx.Dtype) -> bool:
        """Whether a call in `dtype` may take the padded kernel, which reads the routing counts
        on the host mid-graph: a function that runs these experts should then not be
        `mx.compile`d (they would fall back to the gathered kernel)."""
        return self.padded_from(dtype) is not None or self.fast_paths.avoid_sorted_gather_mm

    def in_pieces_for(self, rows: int) -> bool:
        """Whether a gathered call on `rows` routed rows goes in pieces (the policy's
        `gathered_piece_rows`)."""
        pieces = self.fast_paths.gathered_piece_rows
        return pieces is not None and rows > pieces

    def splits(self, rows: int, dtype: mx.Dtype) -> bool:
        """Whether a call on `rows` routed rows in `dtype` can go in parts run one at a time
        (`split`), as the trainer runs them: the padded kernel's expert groups, or the gathered
        kernel's pieces (`in_pieces_for`)."""
        return self.kernel(rows, dtype) == "padded" or self.in_pieces_for(rows)

    def split(self, indices: mx.array, dtype: mx.Dtype) -> PaddedGrid | TokenPieces | None:
        """The parts of a call on routing `indices` in `dtype` (see `splits`): the padded grid
        (reading the routing counts on the host; None inside `mx.compile`), or the gathered
        kernel's pieces; None where the call runs as one graph."""
        if self.kernel(indices.size, dtype) == "padded":
            return PaddedGrid.plan(indices, self.gate_up_proj.dims[0])
        if self.in_pieces_for(indices.size):
            return TokenPieces.plan(indices, self.fast_paths.gathered_piece_rows)
        return None

    @property
    def expert_group(self) -> int:
        """Experts whose dense weights a padded call holds at once (fewer in training)."""
        if self.training:
            return self.fast_paths.padded_training_expert_group
        return self.fast_paths.padded_expert_group

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x (..., D), expert ids and weights (..., k) -> the weighted sum of the chosen experts'
        outputs, (..., D).

        A call that `splits` goes a part at a time (`split`). In inference each part is run
        before the next is built: a GPU frees a kernel's inputs only once it has run, so parts
        built as one graph piled up (an A13B layer's padded forward at 2048 tokens on an H100
        held 3.7 GB in groups of 32 and 4.5 in groups of 8 built as one graph, 0.8 GB in groups
        of 8 run one at a time); inside `mx.compile`, which cannot evaluate, they stay one graph.
        In training the call may be differentiated, and an evaluation under `mx.grad` would keep
        every part for the backward, so the trainer runs the parts itself
        (`tuner/expert_groups.py`), drawing the same dropout masks as this one graph.
        """
        indices = mx.stop_gradient(indices)
        if self.kernel(indices.size, x.dtype) == "every expert":
            return self.every_expert(x, indices, weights)
        split = self.split(indices, x.dtype)
        if split is None:
            return self.gathered(x, indices, weights)
        rows, outs = split.rows(x), []
        for part, run in split.parts(self):
            outs.append(run(rows[part]))
            if not self.training:
                try:
                    mx.eval(outs[-1])
                except ValueError:  # "eval during function transformations": tracing
                    pass
        return weighted_sum(split.unpad(outs), weights)

    def gathered(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """The gathered kernel (the plain path), arguments as `__call__`'s."""
        rows = indices.size
        if rows >= SORT_THRESHOLD:
            return weighted_sum(self.routed(x, indices), weights)
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

    def every_expert(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """The call as every expert on every token, each output scaled by its routing weight
        (zero where the token did not choose the expert): each expert's weights are read once
        for all the tokens, where `gather_qmm` on routed rows reads them once a row on CUDA.
        A call of fewer routed rows than experts runs only as many experts, those it routes to
        first (`call_experts`). Arguments and result as `__call__`'s."""
        k = indices.shape[-1]
        slots = call_experts(indices, self.gate_up_proj.dims[0])
        tokens = x.reshape(1, -1, x.shape[-1])
        first = mx.zeros(slots.shape, dtype=mx.uint32)
        h = self.gate_up_proj(tokens, slots, lhs_indices=first)
        gate, up = mx.split(h, [self.intermediate_size], axis=-1)  # (slots, tokens, I) each
        chosen = indices.reshape(-1, k)[..., None] == slots  # (tokens, k, slots)
        scale = (weights.reshape(-1, k)[..., None] * chosen).sum(axis=1).T[..., None]
        h = nn.silu(gate) * up * scale.astype(x.dtype)
        rows = mx.array(np.arange(slots.size, dtype=np.uint32))
        return self.down_proj(h, slots, lhs_indices=rows).sum(axis=0).reshape(x.shape)

    def routed(self, x: mx.array, indices: mx.array) -> mx.array:
        """Each routed row's output (..., k, D), not yet weighted: the gathered kernel on rows
        sorted by expert, each expert's weights read once for its rows."""
        x_rows, row_indices, inverse_order = gather_sort(mx.expand_dims(x, (-2, -3)), indices)
        out = self.glu(x_rows, row_indices, sorted_indices=True)
        return scatter_unsort(out, inverse_order, indices.shape)

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
