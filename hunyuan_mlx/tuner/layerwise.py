"""The training loss and its gradients computed a decoder layer at a time: what bounds QLoRA's
memory on every backend's policy, whichever kernel the experts take.

One `value_and_grad` over the whole model keeps every tuned layer's activations for the backward
(the gathered experts' sorted rows and their (rows, 2 x I) products, a dozen arrays a layer) and
the whole sequence's float32 logits and their gradient: A13B QLoRA at 2048 tokens on an H100
peaked at weights + 21 GB that way, and the padded experts' host reads would keep every layer's
dequantized experts too (4.8 GB of bf16 at A13B shape). Here the forward runs outside any
transformation (each layer's graph is freed as it goes; only the tuned layers' inputs are kept),
the head and loss go a piece at a time, then each layer's `vjp` is taken in turn from the last:
what gradient checkpointing does, one layer's graph alive at a time. A layer whose experts go in
parts (the padded kernel's expert groups, the gathered kernel's pieces of a long call) takes its
vjp a part at a time (`expert_groups.py`); otherwise, where the experts read nothing on the host
(the gathered kernel), each layer's forward and vjp are compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from ..models.hf_compat import masked_cross_entropy
from .data import split_batch
from .expert_groups import grouped_forward, grouped_vjp, takes_groups, trainable_arrays

# Positions per piece of the head and loss: 512 x 128,167 float32 logits are 262 MB, and their
# gradient as much again, where a 2048-token sequence at once held four times that.
LOSS_CHUNK = 512


def takes_layerwise(model: nn.Module) -> bool:
    """Whether `model` trains a layer at a time: its policy says so (every backend's default
    does, `FastPaths.layerwise_training`), nothing but its decoder layers is trained, and no
    layer reads another's keys and values (cross-layer attention shares them, so the layers'
    gradients would not separate). mlx-lm's models have no policy."""
    policy = getattr(model, "fast_paths", None)
    if policy is None or not policy.layerwise_training:
        return False
    trained = {name.split(".")[1] for name, _ in tree_flatten(model.trainable_parameters())}
    return trained <= {"layers"} and not model.config.use_cla


def compiles(layer: nn.Module, x: mx.array, mask: Any) -> bool:
    """Whether a layer's forward and vjp on `x` may be `mx.compile`d: its experts never read the
    routing counts on the host for `x`'s dtype (which compilation would send to the gathered
    kernel), it runs on one rank, and its mask is a constant ("causal" or None)."""
    moe = layer.mlp
    return (
        moe.sharding_group is None
        and not moe.experts.reads_routing_counts(x.dtype)
        and (mask is None or isinstance(mask, str))
    )


def compiled(layer: nn.Module, name: str, mask: Any, make: Callable[[], Callable]) -> Callable:
    """`make()` compiled once per layer, `name`, mask and trainable parameter names; the layer's
    arrays and the random state are its implicit inputs (dropout draws as uncompiled), kept on
    the layer under a leading underscore, which keeps them out of its parameters."""
    trained = tuple(name for name, _ in tree_flatten(layer.trainable_parameters()))
    fns = layer.get("_train_fns")
    if fns is None:
        fns = layer._train_fns = {}
    key = (name, mask, trained)
    if key not in fns:
        state = [layer, mx.random.state]
        fns[key] = mx.compile(make(), inputs=state, outputs=[mx.random.state])
    return fns[key]


def head_loss_and_grad(
    model: nn.Module, h: mx.array, targets: mx.array, mask: mx.array, loss_chunk: int
) -> tuple[tuple[mx.array, mx.array], mx.array]:
    """The masked mean loss of the final hidden states `h` (B, L, D), its token count, and its
    gradient with respect to `h`, computed `loss_chunk` positions at a time: each piece's float32
    logits and their gradient are freed before the next piece's are made."""
    count = mask.sum()
    loss, cotangents = mx.array(0.0), []
    for start in range(0, h.shape[1], loss_chunk):
        piece = slice(start, start + loss_chunk)

        def piece_loss(h: mx.array, piece: slice = piece) -> mx.array:
            logits = model.lm_head_logits(model.model.norm(h))
            return masked_cross_entropy(logits, targets[:, piece], mask[:, piece], count)[0]

        value, cotangent = mx.value_and_grad(piece_loss)(h[:, piece])
        loss = loss + value
        mx.eval(loss, cotangent)
        cotangents.append(cotangent)
    return (loss, count), mx.concatenate(cotangents, axis=1)


def layer_forward(layer: nn.Module, x: mx.array, mask: Any) -> mx.array:
    """`layer(x, mask)[0]`, evaluated, its experts a part at a time where they go in parts."""
    if takes_groups(layer, x):
        return grouped_forward(layer, x, mask)[0]
    if compiles(layer, x, mask):
        out = compiled(layer, "forward", mask, lambda: lambda x: layer(x, mask)[0])(x)
    else:
        out = layer(x, mask)[0]
    mx.eval(out)
    return out


def layer_vjp(
    layer: nn.Module, x: mx.array, mask: Any, cotangent: mx.array
) -> tuple[dict[str, Any], mx.array]:
    """The gradients of `layer`'s trainable parameters and of its input `x`, given the cotangent
    of its output; a part at a time where its experts go in parts (`expert_groups.py`), compiled
    where its experts read nothing on the host (`compiles`)."""
    if takes_groups(layer, x):
        return grouped_vjp(layer, x, mask, cotangent)
    params, put, tree = trainable_arrays(layer)

    def make() -> Callable:
        def vjp(x: mx.array, cotangent: mx.array, *params: mx.array) -> list[mx.array]:
            own = [p for _, p in tree_flatten(layer.trainable_parameters())]

            def forward(x: mx.array, *params: mx.array) -> mx.array:
                put(params)
                return layer(x, mask)[0]

            grads = mx.vjp(forward, [x, *params], [cotangent])[1]
            put(own)  # the layer's own arrays again, not the vjp's
            return grads

        return vjp

    run = compiled(layer, "vjp", mask, make) if compiles(layer, x, mask) else make()
    dx, *dparams = run(x, cotangent, *params)
    return tree(dparams), dx


def layerwise_loss_and_grad(
    model: nn.Module, batch: mx.array, lengths: mx.array, loss_chunk: int = LOSS_CHUNK
) -> tuple[tuple[mx.array, mx.array], dict[str, Any]]:
    """`nn.value_and_grad(model, masked_loss)(model, batch, lengths)`, a layer at a time.

    Each layer runs twice (forward, then again for its vjp), as with gradient checkpointing, both
    times from the same random seed, drawn for it, so its dropout masks repeat. Layers below the
    lowest trained one are not run backwards. The head and loss go `loss_chunk` positions at a
    time (`head_loss_and_grad`).
    """
    inputs, targets, mask = split_batch(batch, lengths)
    decoder = model.model
    seeds = mx.random.randint(0, 2**31 - 1, (len(decoder.layers),)).tolist()
    grads = model.trainable_parameters()
    layer_grads = grads["model"]["layers"]
    trained = [i for i, g in enumerate(layer_grads) if tree_flatten(g)]
    lowest = min(trained, default=len(layer_grads))
    h = decoder.embed_tokens(inputs)
    attention_mask = create_attention_mask(h, None)
    layer_inputs = {}  # kept for the layers run backwards only, each dropped after its vjp
    for i, (layer, seed) in enumerate(zip(decoder.layers, seeds, strict=True)):
        if i >= lowest:
            layer_inputs[i] = h
        mx.random.seed(seed)
        h = layer_forward(layer, h, attention_mask)

    (loss, tokens), cotangent = head_loss_and_grad(model, h, targets, mask, loss_chunk)
    for i in reversed(range(lowest, len(layer_grads))):
        mx.random.seed(seeds[i])
        layer_grads[i], cotangent = layer_vjp(
            decoder.layers[i], layer_inputs.pop(i), attention_mask, cotangent
        )
        mx.eval(layer_grads[i], cotangent)
    return (loss, tokens), grads
