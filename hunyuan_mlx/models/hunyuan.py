"""HunYuan MoE V1 in MLX, named as transformers' `modeling_hunyuan_v1_moe.py`, read top to bottom.

`HunYuanMoEV1ForCausalLM.__call__(inputs, cache)` is the mlx-lm model protocol, so
`mlx_lm.generate` drives it. transformers' `forward(...)` API (attention mask, position ids,
labels, hidden states) and sequence classification are in `hf_compat.py`; the inference fast paths
in `fast_paths.py`, switched by the `FastPaths` policy the model holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, KVCache

from . import hf_compat
from .config import HunYuanMoEV1Config
from .decode import decode_graph_step, takes_decode_graph
from .experts import GatheredGLU
from .fast_paths import FastPaths, attention, compiled_decode_step, set_fast_paths
from .quantization import ROUTER_DTYPE
from .rope import HunYuanMoEV1RotaryEmbedding
from .sharding import (
    pipeline_stage,
    shard_tensor,
    stage_dtype,
    stage_input,
    stage_output,
)
from .weights import sanitize

Mask = mx.array | str | None  # a boolean/additive array, "causal", or None
KV = tuple[mx.array, mx.array]  # a layer's key and value projections, shared under CLA
Experts = Callable[[mx.array, mx.array, mx.array], mx.array]  # (x, indices, weights) -> output


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

    # Tensor mode (sharding.py): this rank holds some heads, its output is summed over the group.
    sharding_group: mx.distributed.Group | None = None

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
        # The policy attention over a quantized cache follows; the model gives its own.
        self.fast_paths = FastPaths.off()

    def __call__(
        self,
        x: mx.array,
        mask: Mask,
        cache: Any = None,
        shared_kv: KV | None = None,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, KV]:
        """Returns the output and the (unrotated) key/value projections for CLA sharing."""
        offset = cache.offset if cache is not None else 0
        queries, keys, values, shared_kv = self.project(x, offset, shared_kv, position_ids)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        out = attention(queries, keys, values, cache, self.scale, mask, self.fast_paths)
        return self.output(out), shared_kv

    def project(
        self,
        x: mx.array,
        offset: int | mx.array,
        shared_kv: KV | None = None,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, mx.array, mx.array, KV]:
        """Queries, keys and values (B, heads, L, head_dim) of `x` (keys and values from
        `shared_kv` under CLA), and the unrotated key/value projections."""
        if shared_kv is None:
            shared_kv = (self.k_proj(x), self.v_proj(x))
        return *self.heads(self.q_proj(x), shared_kv, offset, position_ids), shared_kv

    def heads(
        self,
        queries: mx.array,
        shared_kv: KV,
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

    def output(self, attn_out: mx.array) -> mx.array:
        """Attention output (B, heads, L, head_dim) -> the projected (B, L, hidden)."""
        out = self.o_proj(merge_heads(attn_out))
        if self.sharding_group is not None:
            out = mx.distributed.all_sum(out, group=self.sharding_group)
        return out


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
    """The router, computed in `ROUTER_DTYPE` (float32, never quantized)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.wg.set_dtype(ROUTER_DTYPE)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wg(x.astype(ROUTER_DTYPE))


class HunYuanMoEV1Moe(nn.Module):
    """Routed experts plus the shared MLP. One expert makes it a dense MLP with no router."""

    # Tensor mode (sharding.py): this rank holds a slice of every expert, the output is summed.
    sharding_group: mx.distributed.Group | None = None

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

    def __call__(self, x: mx.array, experts: Experts | None = None) -> mx.array:
        """The routed experts' output plus the shared expert's; in tensor mode summed over the
        ranks. `experts` stands in for `self.experts` (the grouped trainer's, given its groups'
        outputs)."""
        if self.num_experts == 1:
            # Softmax over one expert is 1: every token goes to expert 0 with weight 1.
            indices = mx.zeros((*x.shape[:-1], 1), dtype=mx.uint32)
            weights = mx.ones(indices.shape, dtype=mx.float32)
        else:
            indices, weights = self.route(x)
        y = (experts or self.experts)(x, indices, weights)
        if "shared_mlp" in self:
            y = y + self.shared_mlp(x)
        if self.sharding_group is not None:
            y = mx.distributed.all_sum(y, group=self.sharding_group)
        return y


class HunYuanMoEV1DecoderLayer(nn.Module):
    def __init__(self, config: HunYuanMoEV1Config, layer_idx: int):
        super().__init__()
        self.self_attn = HunYuanMoEV1Attention(config, layer_idx)
        self.mlp = HunYuanMoEV1Moe(config, layer_idx)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._decode_fns = None  # fast_paths.compiled_decode_step's, compiled on first use

    def __call__(
        self, x: mx.array, mask: Mask, cache: Any = None, shared_kv: KV | None = None,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, KV]:
        """Returns the output and the attention's key/value projections for CLA sharing."""
        h, shared_kv = self.attention_block(x, mask, cache, shared_kv, position_ids)
        return self.mlp_block(h), shared_kv

    def attention_block(
        self, x: mx.array, mask: Mask, cache: Any = None, shared_kv: KV | None = None,
        position_ids: mx.array | None = None,
    ) -> tuple[mx.array, KV]:
        """The first half: input norm, self-attention and the residual; also the attention's
        key/value projections."""
        r, shared_kv = self.self_attn(self.input_layernorm(x), mask, cache, shared_kv, position_ids)
        return x + r, shared_kv

    def mlp_block(self, h: mx.array, experts: Experts | None = None) -> mx.array:
        """The second half: post-attention norm, the MoE block (`experts` as its) and the
        residual."""
        return h + self.mlp(self.post_attention_layernorm(h), experts)

    def compiles_decode(
        self, x: mx.array, mask: Mask, cache: Any, shared_kv: KV | None,
        position_ids: mx.array | None,
    ) -> bool:
        """Whether the call `self(x, mask, cache, shared_kv, position_ids)` can run as
        `compiled_decode_step`: one token with a cache, causal or an array mask (a batch's
        padding), no shared K/V, no explicit positions, a rotation that does not depend on the
        length, in eval mode."""
        return (
            x.shape[1] == 1
            and (mask is None or isinstance(mask, mx.array))
            and cache is not None
            and shared_kv is None
            and position_ids is None
            and not self.training
            and "k_proj" in self.self_attn
            and self.self_attn.rotary_emb.dynamic_factor is None
        )


def attention_mask(h: mx.array, cache: list[Any] | None) -> Mask:
    """mlx-lm's causal mask for `h` over `cache`, but none for one token over a batch's cache
    in which no sequence is left-padded (a lone sequence: mlx-lm's batches drop the padding all
    their sequences share). There the mask is all true, and an array mask costs CUDA its fused
    single-token attention (MLX 0.32.4's takes none; a lone client decoded 11% slower batched
    than queued on an H100, BENCHMARKS.md). The padding is read on the host; it changes only
    when sequences join or leave."""
    first = cache[0] if cache else None
    if (
        isinstance(first, BatchKVCache)
        and h.shape[1] == 1
        and max(first.left_padding.tolist()) == 0
    ):
        return None
    return create_attention_mask(h, first)


class HunYuanMoEV1Model(nn.Module):
    """Embedding, decoder layers and final norm: the hidden states before the head."""

    # Pipeline mode (sharding.py): `layers` are this stage's, numbered from `first_layer`.
    first_layer = 0
    pipeline_group: mx.distributed.Group | None = None

    def __init__(self, config: HunYuanMoEV1Config):
        super().__init__()
        self.config = config
        # Whether single-token steps compile; the model gives its policy (`set_fast_paths`).
        self.fast_paths = FastPaths.off()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [HunYuanMoEV1DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._decode_graphs = None  # decode.decode_graph_step's, compiled on first use

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
        mask: Mask = None,
        position_ids: mx.array | None = None,
        hidden_states: list[mx.array] | None = None,
    ) -> mx.array:
        """Token ids (or embeddings) -> final normed hidden states. `mask` defaults to causal;
        a `hidden_states` list receives the embeddings and every layer's output but the last."""
        if takes_decode_graph(
            self, inputs, cache, input_embeddings=input_embeddings, mask=mask,
            position_ids=position_ids, hidden_states=hidden_states,
        ):
            return decode_graph_step(self, inputs, cache)
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        if mask is None:
            mask = attention_mask(h, cache)
        if self.pipeline_group is not None:
            boundary = stage_dtype(h, self.norm)
            h = stage_input(h, self.pipeline_group, boundary)
        shared_kv = None
        for j, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(h)
            if self.config.layer_has_kv_proj(self.first_layer + j):
                shared_kv = None
            layer_cache = cache[j] if cache else None
            if self.fast_paths.compiled_decode and layer.compiles_decode(
                h, mask, layer_cache, shared_kv, position_ids
            ):
                h, shared_kv = compiled_decode_step(layer, h, layer_cache, mask)
            else:
                h, shared_kv = layer(h, mask, layer_cache, shared_kv, position_ids)
        if self.pipeline_group is not None:
            h = stage_output(h, self.pipeline_group, boundary)
        return self.norm(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def pipeline(self, group: mx.distributed.Group) -> None:
        """Pipeline mode, in place (mlx-lm's protocol): keep this rank's run of layers
        (`sharding.pipeline_stage`), dropping the others before anything of theirs is evaluated;
        the embedding and final norm stay."""
        first, end = pipeline_stage(self.config, group.size(), group.rank())
        self.layers = self.layers[first:end]
        self.first_layer = first
        self.pipeline_group = group

    forward = hf_compat.base_model_forward


class HunYuanMoEV1PreTrainedModel(nn.Module):
    """What every head shares: the config, the decoder and its fast-path policy."""

    def __init__(self, config: HunYuanMoEV1Config, fast_paths: FastPaths | None = None):
        """`fast_paths` defaults to every fast path measured on this backend."""
        super().__init__()
        self.config = config
        self.model = HunYuanMoEV1Model(config)
        set_fast_paths(self, fast_paths or FastPaths.default())

    @property
    def fast_paths(self) -> FastPaths:
        """The model's policy (`fast_paths.set_fast_paths` gives it to the modules that use it)."""
        return self.model.fast_paths

    @fast_paths.setter
    def fast_paths(self, policy: FastPaths) -> None:
        self.model.fast_paths = policy

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize(weights, self.config)

    def shard(self, group: mx.distributed.Group) -> None:
        """Tensor mode, in place (mlx-lm's protocol): this rank's heads and expert slices
        (`sharding.shard_tensor`)."""
        shard_tensor(self, group)

    @property
    def layers(self) -> list[HunYuanMoEV1DecoderLayer]:
        return self.model.layers


class HunYuanMoEV1ForCausalLM(HunYuanMoEV1PreTrainedModel):
    def __init__(self, config: HunYuanMoEV1Config, fast_paths: FastPaths | None = None):
        super().__init__(config, fast_paths)
        self.model_type = config.model_type
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

    def make_cache(self) -> list[KVCache]:
        return self.model.make_cache()

    forward = hf_compat.causal_lm_forward


class HunYuanMoEV1ForSequenceClassification(HunYuanMoEV1PreTrainedModel):
    """A `score` head read at each row's last non-padding token, as transformers does."""

    def __init__(self, config: HunYuanMoEV1Config, fast_paths: FastPaths | None = None):
        super().__init__(config, fast_paths)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.forward(input_ids).logits

    forward = hf_compat.sequence_classification_forward
