"""The training loss and its gradients computed a decoder layer at a time.

The padded experts (`models/experts.py`) read each layer's routing counts on the host. Inside
one `value_and_grad` over the whole model, MLX keeps everything such a read evaluates for the
backward, so every layer's dequantized experts (4.8 GB of bf16 at A13B shape) would stay alive:
A13B QLoRA ran out of an H100's 80 GB at 512 tokens. Here the forward runs outside any
transformation (each layer's graph is freed as it goes; only the layer inputs are kept), then each
layer's `vjp` is taken in turn from the last: what gradient checkpointing does, one layer's graph
alive at a time, and the host reads free to happen.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from ..models.experts import GatheredGLU
from ..models.hf_compat import masked_cross_entropy
from ..models.sharding import stage_dtype
from .data import split_batch
from .expert_groups import grouped_forward, grouped_vjp, takes_groups, trainable_arrays

# Positions per piece of the head and loss: 512 x 128,167 float32 logits are 262 MB, and their
# gradient as much again, where a 2048-token sequence at once held four times that.
LOSS_CHUNK = 512


def takes_layerwise(model: nn.Module) -> bool:
    """Whether `model` trains a layer at a time: its experts may read routing counts on the host
    for its hidden states' dtype (`GatheredGLU.reads_routing_counts`), nothing but its decoder
    layers is trained, and no layer reads another's keys and values (cross-layer attention shares
    them, so the layers' gradients would not separate)."""
    experts = [m for m in model.modules() if isinstance(m, GatheredGLU)]  # none in mlx-lm's
    if not experts:
        return False
    decoder = model.model
    hidden = stage_dtype(decoder.embed_tokens(mx.zeros((1, 1), dtype=mx.int32)), decoder.norm)
    if not any(e.reads_routing_counts(hidden) for e in experts):
        return False
    trained = {name.split(".")[1] for name, _ in tree_flatten(model.trainable_parameters())}
    return trained <= {"layers"} and not model.config.use_cla


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
    """`layer(x, mask)[0]`, evaluated, its padded experts a group at a time where it takes them."""
    if takes_groups(layer, x):
        return grouped_forward(layer, x, mask)[0]
    out = layer(x, mask)[0]
    mx.eval(out)
    return out


def layer_vjp(
    layer: nn.Module, x: mx.array, mask: Any, cotangent: mx.array
) -> tuple[dict[str, Any], mx.array]:
    """The gradients of `layer`'s trainable parameters and of its input `x`, given the cotangent
    of its output; in parts where its padded experts go a group at a time (`expert_groups.py`)."""
    if takes_groups(layer, x):
        return grouped_vjp(layer, x, mask, cotangent)
    params, put, tree = trainable_arrays(layer)

    def forward(x: mx.array, *params: mx.array) -> mx.array:
        put(params)
        return layer(x, mask)[0]

    _, (dx, *dparams) = mx.vjp(forward, [x, *params], [cotangent])
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
