"""transformers' side of the model: `forward(...)` with its arguments and outputs, the padding
mask, sequence-classification pooling, and the losses (one masked cross-entropy for all).

These functions are the `forward` methods of the classes in `hunyuan.py`; they run the same
decoder (`HunYuanMoEV1Model.__call__`) as the mlx-lm protocol does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

IGNORE_INDEX = -100  # label value that carries no loss, as in transformers


@dataclass
class ModelOutput:
    last_hidden_state: mx.array
    past_key_values: list[Any] | None = None
    # (embeddings, output of each layer but the last, final normed output), as transformers.
    hidden_states: tuple[mx.array, ...] | None = None


@dataclass
class CausalLMOutput:
    logits: mx.array
    loss: mx.array | None = None
    past_key_values: list[Any] | None = None
    hidden_states: tuple[mx.array, ...] | None = None


@dataclass
class SequenceClassifierOutput(CausalLMOutput):
    """The same fields; `logits` are pooled per row, (B, num_labels)."""


def base_model_forward(
    model: nn.Module,
    input_ids: mx.array | None = None,
    inputs_embeds: mx.array | None = None,
    attention_mask: mx.array | None = None,
    position_ids: mx.array | None = None,
    past_key_values: list[Any] | None = None,
    use_cache: bool | None = None,
    output_hidden_states: bool = False,
) -> ModelOutput:
    """transformers' arguments; `attention_mask` (B, past + L) is 1 for tokens, 0 for pads."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds")
    h = model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    use_cache = model.config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = model.make_cache()
    cache = past_key_values if use_cache else None
    if attention_mask is None:
        mask = create_attention_mask(h, cache[0] if cache else None)
    else:
        offset = cache[0].offset if cache else 0
        mask = padding_causal_mask(attention_mask, h.shape[1], offset)
    hidden_states = [] if output_hidden_states else None
    out = model(None, cache, h, mask=mask, position_ids=position_ids, hidden_states=hidden_states)
    if output_hidden_states:
        hidden_states = (*hidden_states, out)
    return ModelOutput(out, cache, hidden_states)


def padding_causal_mask(attention_mask: mx.array, length: int, offset: int) -> mx.array:
    """Boolean (B, 1, L, offset + L) mask: causal, and padding keys hidden.

    Each query may always see itself, so a padding query row is never fully masked: a fully
    masked row would give NaN, which the next layer would spread through its values.
    """
    total = offset + length
    if attention_mask.shape[-1] != total:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions, "
            f"expected past + new = {total}"
        )
    query_pos = mx.arange(offset, total)[:, None]
    key_pos = mx.arange(total)[None]
    keep = attention_mask.astype(mx.bool_)[:, None, None, :] & (key_pos <= query_pos)
    return keep | (key_pos == query_pos)


def causal_lm_forward(
    lm: nn.Module,
    *args: Any,
    labels: mx.array | None = None,
    logits_to_keep: int = 0,
    **kwargs: Any,
) -> CausalLMOutput:
    """transformers' forward: `base_model_forward`'s arguments, plus `labels` for the loss and
    `logits_to_keep` > 0 to compute the head for the last N positions only."""
    out = base_model_forward(lm.model, *args, **kwargs)
    hidden = out.last_hidden_state
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    logits = lm.lm_head_logits(hidden)
    loss = causal_lm_loss(logits, labels) if labels is not None else None
    return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states)


def masked_cross_entropy(
    logits: mx.array, targets: mx.array, mask: mx.array, count: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Mean float32 cross-entropy over the positions where `mask` is true, and their count.

    `count` divides the sum instead where given: a piece of a longer sequence then contributes its
    share of the whole sequence's mean.
    """
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(mask, targets, 0))
    count = mask.sum() if count is None else count
    return (losses * mask).sum() / count, count


def causal_lm_loss(logits: mx.array, labels: mx.array) -> mx.array:
    """Mean next-token cross-entropy over labels that are not IGNORE_INDEX."""
    targets = labels[:, 1:]
    return masked_cross_entropy(logits[:, :-1], targets, targets != IGNORE_INDEX)[0]


def sequence_classification_forward(
    classifier: nn.Module, *args: Any, labels: mx.array | None = None, **kwargs: Any
) -> SequenceClassifierOutput:
    """The `score` head at each row's last non-padding token (`base_model_forward`'s arguments),
    and transformers' loss for `labels`."""
    out = base_model_forward(classifier.model, *args, **kwargs)
    input_ids = args[0] if args else kwargs.get("input_ids")
    logits = classifier.score(out.last_hidden_state)
    batch_size = logits.shape[0]
    pad = classifier.config.pad_token_id
    if pad is None and batch_size != 1:
        raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
    if pad is None or input_ids is None:
        last = mx.full((batch_size,), logits.shape[1] - 1)
    else:
        # The rightmost non-padding token, for left and right padding alike.
        positions = mx.arange(input_ids.shape[-1])
        last = mx.argmax(positions * (input_ids != pad), axis=-1)
    pooled = logits[mx.arange(batch_size), last]
    loss = None
    if labels is not None:
        loss = classification_loss(pooled, labels, classifier.config)
    return SequenceClassifierOutput(pooled, loss, out.past_key_values, out.hidden_states)


def classification_loss(pooled: mx.array, labels: mx.array, config: Any) -> mx.array:
    """The loss transformers picks from `problem_type` (inferred from labels when unset)."""
    problem_type, num_labels = config.problem_type, config.num_labels
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif mx.issubdtype(labels.dtype, mx.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    pooled = pooled.astype(mx.float32)
    if problem_type == "regression":
        if num_labels == 1:
            pooled, labels = pooled.squeeze(), labels.squeeze()
        return nn.losses.mse_loss(pooled, labels.astype(mx.float32))
    if problem_type == "single_label_classification":
        labels = labels.reshape(-1)
        return masked_cross_entropy(
            pooled.reshape(-1, num_labels), labels, labels != IGNORE_INDEX
        )[0]
    return nn.losses.binary_cross_entropy(
        pooled, labels.astype(mx.float32), with_logits=True
    ).mean()
