"""Synthetic bf16 checkpoints in the release's layout (names, per-expert tensors, shards), with
random weights: what the converter benchmarks read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx


def release_config(layers: int, experts: int, hidden: int, width: int, vocab: int) -> dict:
    """A config.json in the release's form (model_type "hunyuan"), reduced in size."""
    return {
        "architectures": ["HunYuanMoEV1ForCausalLM"],
        "model_type": "hunyuan",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": width,
        "moe_intermediate_size": [width] * layers,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": max(1, hidden // 512),
        "attention_head_dim": 128,
        "num_experts": experts,
        "moe_topk": [min(8, experts)] * layers,
        "num_shared_expert": [1] * layers,
        "use_mixed_mlp_moe": True,
        "use_qk_norm": True,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
        "torch_dtype": "bfloat16",
    }


def release_tensors(config: dict):
    """(name, shape) of every tensor in the release's order, `lm_head.weight` included."""
    d, i, e = config["hidden_size"], config["intermediate_size"], config["num_experts"]
    q = config["num_attention_heads"] * 128
    kv = config["num_key_value_heads"] * 128
    yield "model.embed_tokens.weight", (config["vocab_size"], d)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        yield f"{p}.input_layernorm.weight", (d,)
        for name, shape in (("q", (q, d)), ("k", (kv, d)), ("v", (kv, d)), ("o", (d, q))):
            yield f"{p}.self_attn.{name}_proj.weight", shape
        yield f"{p}.self_attn.query_layernorm.weight", (128,)
        yield f"{p}.self_attn.key_layernorm.weight", (128,)
        yield f"{p}.post_attention_layernorm.weight", (d,)
        yield f"{p}.mlp.gate.wg.weight", (e, d)
        for proj, shape in (("gate", (i, d)), ("up", (i, d)), ("down", (d, i))):
            yield f"{p}.mlp.shared_mlp.{proj}_proj.weight", shape
        for x in range(e):
            for proj, shape in (("gate", (i, d)), ("up", (i, d)), ("down", (d, i))):
                yield f"{p}.mlp.experts.{x}.{proj}_proj.weight", shape
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (config["vocab_size"], d)


def small_init(name: str, shape: tuple[int, ...]) -> mx.array:
    """Norms at 1, every other weight N(0, 0.02): enough for a memory measurement."""
    if "norm" in name:
        return mx.ones(shape)
    return 0.02 * mx.random.normal(shape)


def write_checkpoint(
    path: Path,
    config: dict,
    shard_bytes: int,
    init: Callable[[str, tuple[int, ...]], mx.array] = small_init,
) -> list[Path]:
    """Random bf16 weights in shards of about `shard_bytes`, with an index; one shard in memory."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[dict[str, mx.array]] = [{}]
    files, size, weight_map = [], 0, {}

    def flush() -> None:
        file = path / f"part-{len(files):05d}.safetensors"
        mx.save_safetensors(str(file), shards[0])
        weight_map.update(dict.fromkeys(shards[0], len(files)))
        files.append(file)
        shards[0] = {}

    for name, shape in release_tensors(config):
        array = init(name, shape).astype(mx.bfloat16)
        mx.eval(array)
        if shards[0] and size + array.nbytes > shard_bytes:
            flush()
            size = 0
        shards[0][name] = array
        size += array.nbytes
    flush()
    names = [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    for file, name in zip(files, names):
        file.rename(path / name)
    index = {"metadata": {}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return [path / n for n in names]
