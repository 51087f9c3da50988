"""A decoder layer's forward and vjp with its routed experts run a part at a time: the padded
kernel's expert groups, or the gathered kernel's pieces of whole tokens (`GatheredGLU.split`).

A GPU frees a kernel's inputs only once it has run it, so one graph over a layer's padded experts
held every group's dense weights at once (an A13B layer's vjp peaked 20 GB above the weights at
2048 tokens on an H100), and evaluating inside `mx.vjp` would not help: MLX keeps what it
evaluates there for the backward. So the layer's vjp is taken in three parts, each evaluated
outside any transformation, with the parts' outputs as inputs in between:

1. around the parts: the layer's two halves (`attention_block`, `mlp_block`) with the parts'
   outputs given in place of the routed experts; its vjp gives the cotangent of each part's
   output;
2. each part's own vjp, one at a time: its rows' cotangent, its adapters' gradient;
3. the rows' vjp (attention and the norm up to the parts' rows): the rest of the input's.

Random draws (LoRA dropout) repeat the forward's, and the one-graph step's, which runs the same
parts: each part starts from the key the forward had there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..models.experts import PaddedGrid, Part, TokenPieces, weighted_sum


def random_key() -> int:
    """The global PRNG key, as the int that `mx.random.seed` restores it from."""
    high, low = mx.random.state[0].tolist()
    return high << 32 | low


def trainable_arrays(
    layer: nn.Module,
) -> tuple[list[mx.array], Callable[[Sequence[mx.array]], None], Callable[[Sequence], dict]]:
    """`layer`'s trainable arrays as a flat list (the primals of a vjp), a function that puts such
    a list into the layer, and one that makes a like list (their gradients) a parameter tree."""
    flat = tree_flatten(layer.trainable_parameters())
    names = [name for name, _ in flat]

    def tree(arrays: Sequence) -> dict:
        return tree_unflatten(list(zip(names, arrays, strict=True)))

    def put(arrays: Sequence[mx.array]) -> None:
        layer.update(tree(arrays))

    return [p for _, p in flat], put, tree


def takes_groups(layer: nn.Module, x: mx.array) -> bool:
    """Whether `layer(x, mask)` runs its routed experts in parts (`GatheredGLU.splits`), which
    this module can take one at a time (a router, one rank)."""
    moe = layer.mlp
    rows = math.prod(x.shape[:-1]) * moe.top_k
    return moe.num_experts > 1 and moe.sharding_group is None and moe.experts.splits(rows, x.dtype)


@dataclass
class GroupedForward:
    """What the forward leaves for the vjp: the experts' split, its parts and rows, each part's
    output, and the random key before the attention, each part and the shared expert."""

    split: PaddedGrid | TokenPieces
    parts: list[Part]
    rows: mx.array
    outs: list[mx.array]
    keys: list[int]

    def experts(self, outs: list[mx.array]) -> Callable[..., mx.array]:
        """The routed experts' stand-in in the MoE block (`mlp_block(h, experts)`), given the
        parts' outputs `outs`."""

        def given(x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
            mx.random.seed(self.keys[-1])  # the shared expert's draws follow
            return weighted_sum(self.split.unpad(outs), weights)

        return given


def grouped_forward(layer: nn.Module, x: mx.array, mask: Any) -> tuple[mx.array, GroupedForward]:
    """`layer(x, mask)[0]`, each part of its routed experts evaluated before the next is built."""
    experts = layer.mlp.experts
    keys = [random_key()]
    h = layer.attention_block(x, mask)[0]
    forward = None

    def run_parts(n: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """The routed experts a part at a time, each evaluated before the next is built."""
        nonlocal forward
        split = experts.split(indices, n.dtype)
        parts = split.parts(experts)
        rows = split.rows(n)
        outs = []
        for part, run in parts:
            keys.append(random_key())
            outs.append(run(rows[part]))
            mx.eval(outs[-1])
        keys.append(random_key())
        forward = GroupedForward(split, parts, rows, outs, keys)
        return forward.experts(outs)(n, indices, weights)

    out = layer.mlp_block(h, run_parts)
    mx.eval(out)
    return out, forward


def grouped_vjp(
    layer: nn.Module, x: mx.array, mask: Any, cotangent: mx.array
) -> tuple[dict[str, Any], mx.array]:
    """`layerwise.layer_vjp` in the three parts above."""
    params, taking, tree = trainable_arrays(layer)
    _, forward = grouped_forward(layer, x, mask)
    parts = forward.parts

    def vjp(fn: Callable, primals: list[mx.array], cotangent: mx.array) -> list[mx.array]:
        return mx.vjp(fn, [*primals, *params], [cotangent])[1]

    def around(x: mx.array, *rest: mx.array) -> mx.array:
        taking(rest[len(parts) :])
        mx.random.seed(forward.keys[0])
        h = layer.attention_block(x, mask)[0]
        return layer.mlp_block(h, forward.experts(list(rest[: len(parts)])))

    dx, *rest = vjp(around, [x, *forward.outs], cotangent)
    out_cotangents, grads = rest[: len(parts)], rest[len(parts) :]
    mx.eval(dx, out_cotangents, grads)
    forward.outs.clear()  # needed by `around` only

    row_cotangents = []
    for (part, run), key, out_cotangent in zip(
        parts, forward.keys[1:-1], out_cotangents, strict=True
    ):

        def run_part(rows: mx.array, *params: mx.array, run=run, key=key) -> mx.array:
            taking(params)
            mx.random.seed(key)
            return run(rows)

        drows, *dparams = vjp(run_part, [forward.rows[part]], out_cotangent)
        grads = [a + b for a, b in zip(grads, dparams, strict=True)]
        row_cotangents.append(drows)
        mx.eval(drows, grads)

    def rows_of(x: mx.array, *params: mx.array) -> mx.array:
        taking(params)
        mx.random.seed(forward.keys[0])
        return forward.split.rows(layer.post_attention_layernorm(layer.attention_block(x, mask)[0]))

    dx_rows, *dparams = vjp(rows_of, [x], mx.concatenate(row_cotangents))
    grads = [a + b for a, b in zip(grads, dparams, strict=True)]
    taking(params)  # the layer's own arrays again, not the last vjp's
    return tree(grads), dx + dx_rows
