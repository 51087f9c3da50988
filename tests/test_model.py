"""Parity with transformers' HunYuanMoEV1 (the oracle): logits to 1e-4 in float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, build_torch_model, save_checkpoint

from hunyuan_mlx import HunYuanMoEV1ForSequenceClassification, load_model

ATOL = 1e-4
SEQ_LEN = 40  # 40 tokens x top-2 = 80 routed rows: the sorted gather path is taken


def tokens(seed: int = 0, batch: int = 1, length: int = SEQ_LEN, vocab: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def fresh_rope(model) -> None:
    """Forget the longest length transformers' dynamic RoPE has seen in earlier calls: it keeps
    that base for later, shorter sequences, while ours depends on the sequence alone."""
    rope = model.model.rotary_emb
    rope.inv_freq = rope.original_inv_freq.clone()
    rope.max_seq_len_cached = rope.original_max_seq_len


def torch_logits(model, ids: np.ndarray, **kwargs) -> np.ndarray:
    fresh_rope(model)
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def torch_chunked_logits(model, ids: np.ndarray, bounds: list[int]) -> np.ndarray:
    """transformers run chunk by chunk with its cache: the oracle for decoding (dynamic NTK
    RoPE rotates each chunk with the base of the length so far, so it differs from one pass)."""
    from transformers import DynamicCache

    fresh_rope(model)
    cache, out = DynamicCache(), []
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            chunk = torch.tensor(ids[:, a:b])
            out.append(model(chunk, cache=cache, use_cache=True).logits.float().numpy())
    return np.concatenate(out, axis=1)


def convert(torch_model, tmp_path, **kwargs):
    return load_model(save_checkpoint(torch_model, tmp_path / "ckpt"), **kwargs)


def max_diff(a, b) -> float:
    return float(np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32)).max())


VARIANTS = {
    "default": {},
    "tied": dict(tie_word_embeddings=True),
    "topk-per-layer": dict(moe_topk=[1, 3]),
    "gqa-1": dict(num_key_value_heads=4),
    "gqa-4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "head-dim-not-hidden-over-heads": dict(head_dim=24),
    "rope-linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope-ntk-alpha": dict(rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0}),
    # max_position_embeddings below the sequence length, so the dynamic base really grows.
    "rope-dynamic": dict(
        rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16
    ),
    "attention-bias": dict(attention_bias=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save) for one config variant."""
    torch_model = build_torch_model(**VARIANTS[request.param])
    return torch_model, convert(torch_model, tmp_path_factory.mktemp(request.param))


def test_whole_sequence_logits(pair):
    torch_model, model = pair
    ids = tokens()
    assert max_diff(model(mx.array(ids)), torch_logits(torch_model, ids)) <= ATOL


def test_token_by_token_decode_with_cache(pair):
    torch_model, model = pair
    ids = tokens(1, length=20)
    expected = torch_chunked_logits(torch_model, ids, list(range(21)))
    cache = model.make_cache()
    steps = [model(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(ids.shape[1])]
    assert max_diff(mx.concatenate(steps, axis=1), expected) <= ATOL


def test_prefill_then_decode_in_chunks(pair):
    torch_model, model = pair
    ids = tokens(2)
    bounds = [0, 17, 18, 25, 33, SEQ_LEN]
    expected = torch_chunked_logits(torch_model, ids, bounds)
    cache = model.make_cache()
    chunks = [model(mx.array(ids[:, a:b]), cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert max_diff(mx.concatenate(chunks, axis=1), expected) <= ATOL


def test_left_padded_batch(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    model = load_model(path)
    ids = tokens(3, batch=2, length=24)
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # the second row is 17 tokens, left-padded
    expected = torch_logits(torch_model, ids, attention_mask=torch.tensor(mask))
    out = model.forward(mx.array(ids), attention_mask=mx.array(mask)).logits
    assert max_diff(out[0], expected[0]) <= ATOL
    assert max_diff(out[1, 7:], expected[1, 7:]) <= ATOL
    # QK-norm after RoPE makes attention depend on absolute positions: with position ids that
    # skip the padding, the padded row equals the same tokens run alone.
    position_ids = np.maximum(mask.cumsum(-1) - 1, 0)
    expected = torch_logits(
        torch_model, ids, attention_mask=torch.tensor(mask), position_ids=torch.tensor(position_ids)
    )
    out = model.forward(
        mx.array(ids), attention_mask=mx.array(mask), position_ids=mx.array(position_ids)
    ).logits
    assert max_diff(out[1, 7:], expected[1, 7:]) <= ATOL
    assert max_diff(out[1, 7:], model(mx.array(ids[1:, 7:]))[0]) <= ATOL


def test_left_padded_batch_decodes_with_cache(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    model = load_model(path)
    ids = tokens(4, batch=2, length=20)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    expected = torch_logits(torch_model, ids, attention_mask=torch.tensor(mask))
    cache = model.make_cache()
    prefill = model.forward(
        mx.array(ids[:, :16]), attention_mask=mx.array(mask[:, :16]), past_key_values=cache
    )
    steps = [prefill.logits]
    for i in range(16, 20):
        out = model.forward(
            mx.array(ids[:, i : i + 1]),
            attention_mask=mx.array(mask[:, : i + 1]),
            past_key_values=cache,
        )
        steps.append(out.logits)
    got = mx.concatenate(steps, axis=1)
    assert max_diff(got[0, 5:], expected[0, 5:]) <= ATOL
    assert max_diff(got[1], expected[1]) <= ATOL


def test_loss_with_labels(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    model = load_model(path)
    ids = tokens(5, batch=2, length=16)
    labels = ids.copy()
    labels[:, :6] = -100  # prompt tokens carry no loss
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    loss = model.forward(mx.array(ids), labels=mx.array(labels)).loss.item()
    assert abs(loss - expected) <= 1e-5


def test_hidden_states_and_logits_to_keep(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    model = load_model(path)
    ids = tokens(6, length=12)
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), output_hidden_states=True, logits_to_keep=3)
    out = model.forward(mx.array(ids), output_hidden_states=True, logits_to_keep=3)
    assert out.logits.shape == (1, 3, 96)
    assert max_diff(out.logits, ref.logits.numpy()) <= ATOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert max_diff(ours, theirs.numpy()) <= ATOL


def test_mlx_lm_generate_drives_the_model(tiny_checkpoint):
    """mlx-lm's generation loop runs our model and agrees with a plain greedy loop."""
    from mlx_lm.generate import generate_step

    path, _ = tiny_checkpoint
    model = load_model(path)
    prompt = mx.array(tokens(7, length=10)[0])
    ours = [tok for tok, _ in generate_step(prompt, model, max_tokens=8)]
    ids = prompt.tolist()
    for _ in range(8):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    assert ours == ids[10:]


@pytest.mark.parametrize(
    "problem_type, labels",
    [
        ("single_label_classification", np.array([2, 0])),
        ("regression", np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], dtype=np.float32)),
        ("multi_label_classification", np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32)),
    ],
)
def test_sequence_classification(tmp_path, problem_type, labels):
    torch_model = build_torch_model(
        model_class="HunYuanMoEV1ForSequenceClassification", num_labels=3, problem_type=problem_type
    )
    model = load_model(
        save_checkpoint(torch_model, tmp_path / "cls"),
        model_class=HunYuanMoEV1ForSequenceClassification,
    )
    ids = tokens(8, batch=2, length=12)
    ids[1, 9:] = 0  # right padding (pad_token_id 0): pooled at position 8
    ids[0] = np.where(ids[0] == 0, 1, ids[0])
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), labels=torch.tensor(labels))
    out = model.forward(mx.array(ids), labels=mx.array(labels))
    assert max_diff(out.logits, ref.logits.numpy()) <= ATOL
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5


def plain_reference_logits(model, ids: np.ndarray) -> np.ndarray:
    """The MoE written out expert by expert with numpy routing, around our attention layers."""
    h = model.model.embed_tokens(mx.array(ids))
    for layer in model.model.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), "causal")[0]
        x = np.array(layer.post_attention_layernorm(h))[0]
        moe = layer.mlp
        out = np.zeros_like(x)
        if moe.num_experts == 1:
            choices = [([0], [1.0])] * len(x)
        else:
            logits = x @ np.array(moe.gate.wg.weight).T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            top = np.argsort(-probs, axis=-1)[:, : moe.top_k]
            choices = [(t, probs[i, t] / probs[i, t].sum()) for i, t in enumerate(top)]
        gate_up = np.array(moe.experts.gate_up_proj.weight)
        down = np.array(moe.experts.down_proj.weight)
        width = gate_up.shape[1] // 2
        for i, (experts, weights) in enumerate(choices):
            for e, w in zip(experts, weights):
                g, u = gate_up[e, :width] @ x[i], gate_up[e, width:] @ x[i]
                out[i] += w * (down[e] @ (g / (1 + np.exp(-g)) * u))
        out = out + np.array(moe.shared_mlp(mx.array(x)))
        h = h + mx.array(out)[None]
    return np.array(model.lm_head_logits(model.model.norm(h)))


def test_per_layer_expert_counts_match_plain_reference(tmp_path):
    """Per-layer num_experts lists (transformers cannot build them) against a loop over experts."""
    from hunyuan_mlx import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

    config = HunYuanMoEV1Config(
        **{
            **TINY_CONFIG,
            "num_hidden_layers": 3,
            "num_experts": [8, 1, 4],
            "moe_topk": [2, 1, 3],
            "moe_intermediate_size": [32, 48, 16],
        }
    )
    mx.random.seed(0)
    model = HunYuanMoEV1ForCausalLM(config)
    assert "gate" not in model.model.layers[1].mlp  # one expert: a dense MLP, no router
    ids = tokens(9, length=SEQ_LEN)
    assert max_diff(model(mx.array(ids)), plain_reference_logits(model, ids)) <= ATOL


def test_cross_layer_attention_shares_keys_and_values():
    """With use_cla, odd layers own no K/V projections and reuse their group's; the cache agrees."""
    from hunyuan_mlx import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

    config = HunYuanMoEV1Config(
        **{**TINY_CONFIG, "num_hidden_layers": 4, "use_cla": True, "cla_share_factor": 2}
    )
    mx.random.seed(1)
    model = HunYuanMoEV1ForCausalLM(config)
    assert ["k_proj" in layer.self_attn for layer in model.layers] == [True, False, True, False]
    ids = mx.array(tokens(10, length=12))
    cache = model.make_cache()
    steps = [model(ids[:, i : i + 1], cache=cache) for i in range(12)]
    assert max_diff(mx.concatenate(steps, axis=1), model(ids)) <= ATOL


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_routing_weights_are_the_top_k_softmax_probabilities(norm_topk_prob):
    """The router picks the k most probable experts; their weights are the float32 softmax
    probabilities, renormalised over the k as the reference does unless `norm_topk_prob` is off."""
    from hunyuan_mlx.models.config import HunYuanMoEV1Config
    from hunyuan_mlx.models.hunyuan import HunYuanMoEV1Moe

    config = HunYuanMoEV1Config(
        hidden_size=32, num_experts=16, moe_topk=4, norm_topk_prob=norm_topk_prob
    )
    moe = HunYuanMoEV1Moe(config, 0)
    x = mx.random.normal((2, 7, 32), key=mx.random.key(1))
    indices, weights = moe.route(x)
    logits = np.array(moe.gate(x), dtype=np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.sort(np.argsort(-probs, axis=-1)[..., :4], axis=-1)
    assert (np.sort(np.array(indices), axis=-1) == expected).all()
    picked = np.take_along_axis(probs, np.array(indices), axis=-1)
    if norm_topk_prob:
        picked /= picked.sum(-1, keepdims=True)
    assert weights.dtype == mx.float32
    assert np.abs(np.array(weights) - picked).max() <= 1e-6
