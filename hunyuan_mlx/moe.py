"""The mixture-of-experts block: float32 router, top-k, renormalised weights, gathered experts.

Routing (`HunYuanMoEV1Moe`) is kept apart from expert compute (`GatheredGLU`), which applies
each token's k experts with one gathered matmul per projection over stacked expert weights
(`mx.gather_mm`, or `mx.gather_qmm` once quantized) instead of looping over experts. No token is
ever dropped.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

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
    """Undo `gather_sort`: rows back in token order, reshaped to `shape` (..., k) + x's tail."""
    return mx.unflatten(x[inverse_order], 0, shape)


class GatheredLinear(nn.Module):
    """`num_experts` bias-free linear layers stored as one (E, out, in) array, applied per row."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and mx.default_device().type == mx.DeviceType.cpu:
            # MLX's CPU backend has gather_mm for float32 only; GPUs take every float type.
            out = mx.gather_mm(
                x.astype(mx.float32),
                weight.astype(mx.float32),
                rhs_indices=indices,
                sorted_indices=sorted_indices,
            )
            return out.astype(x.dtype)
        return mx.gather_mm(x, weight, rhs_indices=indices, sorted_indices=sorted_indices)

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

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
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

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> each chosen expert's output, (..., k, D)."""
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= SORT_THRESHOLD
        rows, row_indices = x, indices
        if do_sort:
            rows, row_indices, inverse_order = gather_sort(x, indices)
        gate, up = mx.split(
            self.gate_up_proj(rows, row_indices, sorted_indices=do_sort),
            [self.intermediate_size],
            axis=-1,
        )
        out = self.down_proj(nn.silu(gate) * up, row_indices, sorted_indices=do_sort)
        if do_sort:
            out = scatter_unsort(out, inverse_order, indices.shape)
        return out.squeeze(-2)


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
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, indices, axis=-1)
        # Unlike mlx-lm's hunyuan.py, renormalise as the reference does (norm_topk_prob).
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return indices, weights

    def __call__(self, x: mx.array) -> mx.array:
        if self.num_experts == 1:
            # Softmax over one expert is 1: every token goes to expert 0 with weight 1.
            y = self.experts(x, mx.zeros((*x.shape[:-1], 1), dtype=mx.uint32)).squeeze(-2)
        else:
            indices, weights = self.route(x)
            y = self.experts(x, indices)
            y = (y * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if "shared_mlp" in self:
            y = y + self.shared_mlp(x)
        return y
