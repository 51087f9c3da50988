"""HunYuan MoE V1 in MLX, laid out as transformers' `modeling_hunyuan_v1_moe.py`.

`HunYuanMoEV1ForCausalLM.__call__(inputs, cache)` is the mlx-lm model protocol (so
`mlx_lm.generate` drives it); `forward(...)` takes transformers' arguments (attention mask,
position ids, labels, hidden states) for parity tests, training and batched use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from .config import HunYuanMoEV1Config
from .moe import HunYuanMoEV1Moe, fast_paths_enabled
from .rope import HunYuanMoEV1RotaryEmbedding
from .weights import sanitize

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


def split_heads(x: mx.array, num_heads: int) -> mx.array:
    """(B, L, heads * head_dim) -> (B, heads, L, head_dim)."""
    B, L, _ = x.shape
    if L == 1:  # the same layout without a transpose: one graph node fewer a decode step
        return x.reshape(B, num_heads, 1, -1)
    return x.reshape(B, L, num_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """(B, heads, L, head_dim) -> (B, L, heads * head_dim), the inverse of `split_heads`."""
    B, _, L, _ = x.shape
    if L == 1:
        return x.reshape(B, 1, -1)
    return x.transpose(0, 2, 1, 3).reshape(B, L, -1)


class HunYuanMoEV1Attention(nn.Module):
    """GQA attention; RoPE first, then RMSNorm of each query and key head (QK-norm)."""

    def __init__(self, config: HunYuanMoEV1Config, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        # With cross-layer attention only the first layer of a group projects keys and values.
        if config.layer_has_kv_proj(layer_idx):
            self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if config.use_qk_norm:
            self.query_layernorm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = HunYuanMoEV1RotaryEmbedding(config)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | str | None,
        cache: Any = None,
        shared_kv: tuple[mx.array, mx.array] | None = None,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Returns the output and the (unrotated) key/value projections for CLA sharing."""
        if shared_kv is None:
            shared_kv = (self.k_proj(x), self.v_proj(x))
        offset = cache.offset if cache is not None else 0
        queries, keys, values = self.heads(self.q_proj(x), shared_kv, offset, position_ids)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        out = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        return self.o_proj(merge_heads(out)), shared_kv

    def heads(
        self,
        queries: mx.array,
        shared_kv: tuple[mx.array, mx.array],
        offset: int | mx.array,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Projections (B, L, heads * head_dim) -> (B, heads, L, head_dim): RoPE, then QK-norm."""
        queries = split_heads(queries, self.num_heads)
        keys, values = (split_heads(t, self.num_key_value_heads) for t in shared_kv)
        queries = self.rotary_emb(queries, offset, position_ids)
        keys = self.rotary_emb(keys, offset, position_ids)
        if "query_layernorm" in self:
            queries = self.query_layernorm(queries)
            keys = self.key_layernorm(keys)
        return queries, keys, values


class HunYuanMoEV1DecoderLayer(nn.Module):
    def __init__(self, config: HunYuanMoEV1Config, layer_idx: int):
        super().__init__()
        self.self_attn = HunYuanMoEV1Attention(config, layer_idx)
        self.mlp = HunYuanMoEV1Moe(config, layer_idx)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._decode_fns = None  # compiled on the first single-token step

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | str | None,
        cache: Any = None,
        shared_kv: tuple[mx.array, mx.array] | None = None,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        if (
            x.shape[1] == 1
            and mask is None
            and cache is not None
            and shared_kv is None
            and position_ids is None
            and not self.training
            and fast_paths_enabled()
            and "k_proj" in self.self_attn
            and self.self_attn.rotary_emb.dynamic_factor is None
        ):
            return self.decode_step(x, cache)
        r, shared_kv = self.self_attn(self.input_layernorm(x), mask, cache, shared_kv, position_ids)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h)), shared_kv

    def decode_step(self, x: mx.array, cache: Any) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """One new token: the same computation, with all but the cache update and attention
        itself in two `mx.compile`d functions (fewer, fused kernels and no per-op Python).

        The layer's parameters are the compiled functions' implicit inputs, so new weights
        (loading, adapters) are picked up; a changed structure traces anew.
        """
        if self._decode_fns is None:
            self._decode_fns = (
                mx.compile(self._decode_pre, inputs=[self]),
                mx.compile(self._decode_post, inputs=[self]),
            )
        pre, post = self._decode_fns
        queries, keys, values, shared_kv = pre(x, mx.array(cache.offset))
        keys, values = cache.update_and_fetch(keys, values)
        attn = self.self_attn
        out = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=attn.scale, mask=None
        )
        return post(x, out), shared_kv

    def _decode_pre(self, x: mx.array, offset: mx.array):
        attn = self.self_attn
        h = self.input_layernorm(x)
        shared_kv = (attn.k_proj(h), attn.v_proj(h))
        return *attn.heads(attn.q_proj(h), shared_kv, offset), shared_kv

    def _decode_post(self, x: mx.array, attn_out: mx.array) -> mx.array:
        h = x + self.self_attn.o_proj(merge_heads(attn_out))
        return h + self.mlp(self.post_attention_layernorm(h))


class HunYuanMoEV1Model(nn.Module):
    """Embedding, decoder layers and final norm: the hidden states before the head."""

    def __init__(self, config: HunYuanMoEV1Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [HunYuanMoEV1DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        mask = create_attention_mask(h, cache[0] if cache else None)
        return self._decode(h, mask, cache).last_hidden_state

    def forward(
        self,
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
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = self.make_cache()
        cache = past_key_values if use_cache else None
        if attention_mask is None:
            mask = create_attention_mask(h, cache[0] if cache else None)
        else:
            offset = cache[0].offset if cache else 0
            mask = padding_causal_mask(attention_mask, h.shape[1], offset)
        return self._decode(h, mask, cache, position_ids, output_hidden_states)

    def _decode(
        self,
        h: mx.array,
        mask: mx.array | str | None,
        cache: list[Any] | None,
        position_ids: mx.array | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        hidden_states = [h] if output_hidden_states else None
        shared_kv = None
        for i, layer in enumerate(self.layers):
            if self.config.layer_has_kv_proj(i):
                shared_kv = None
            h, shared_kv = layer(h, mask, cache[i] if cache else None, shared_kv, position_ids)
            if output_hidden_states and i < len(self.layers) - 1:
                hidden_states.append(h)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        return ModelOutput(h, cache, tuple(hidden_states) if output_hidden_states else None)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]


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


class HunYuanMoEV1ForCausalLM(nn.Module):
    def __init__(self, config: HunYuanMoEV1Config):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.model = HunYuanMoEV1Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        """mlx-lm protocol: token ids (B, L) -> logits (B, L, vocab)."""
        return self.lm_head_logits(self.model(inputs, cache, input_embeddings))

    def lm_head_logits(self, hidden: mx.array) -> mx.array:
        """Tied embeddings use the embedding matrix as the head, whatever the checkpoint carries."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: mx.array | None = None,
        inputs_embeds: mx.array | None = None,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        past_key_values: list[Any] | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        labels: mx.array | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """transformers' forward. `logits_to_keep` > 0 computes the head for the last N only."""
        out = self.model.forward(
            input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head_logits(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states)

    def make_cache(self) -> list[KVCache]:
        return self.model.make_cache()

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize(weights, self.config)

    @property
    def layers(self) -> list[HunYuanMoEV1DecoderLayer]:
        return self.model.layers


def causal_lm_loss(logits: mx.array, labels: mx.array) -> mx.array:
    """Mean next-token cross-entropy in float32 over labels that are not IGNORE_INDEX."""
    logits = logits[:, :-1].astype(mx.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    losses = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0))
    return (losses * valid).sum() / valid.sum()


class HunYuanMoEV1ForSequenceClassification(nn.Module):
    """A `score` head read at each row's last non-padding token, as transformers does."""

    def __init__(self, config: HunYuanMoEV1Config):
        super().__init__()
        self.config = config
        self.model = HunYuanMoEV1Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.forward(input_ids).logits

    def forward(
        self,
        input_ids: mx.array | None = None,
        inputs_embeds: mx.array | None = None,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        past_key_values: list[Any] | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        labels: mx.array | None = None,
    ) -> SequenceClassifierOutput:
        out = self.model.forward(
            input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            output_hidden_states,
        )
        logits = self.score(out.last_hidden_state)
        batch_size = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            last = mx.full((batch_size,), logits.shape[1] - 1)
        else:
            # The rightmost non-padding token, for left and right padding alike.
            positions = mx.arange(input_ids.shape[-1])
            last = mx.argmax(positions * (input_ids != pad), axis=-1)
        pooled = logits[mx.arange(batch_size), last]
        loss = self.classification_loss(pooled, labels) if labels is not None else None
        return SequenceClassifierOutput(pooled, loss, out.past_key_values, out.hidden_states)

    def classification_loss(self, pooled: mx.array, labels: mx.array) -> mx.array:
        """The loss transformers picks from `problem_type` (inferred from labels when unset)."""
        problem_type = self.config.problem_type
        num_labels = self.config.num_labels
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
            valid = labels != IGNORE_INDEX
            losses = nn.losses.cross_entropy(
                pooled.reshape(-1, num_labels), mx.where(valid, labels, 0)
            )
            return (losses * valid).sum() / valid.sum()
        return nn.losses.binary_cross_entropy(
            pooled, labels.astype(mx.float32), with_logits=True
        ).mean()

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize(weights, self.config)
