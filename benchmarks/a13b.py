"""Hunyuan-A13B-shaped models from random quantized weights, built directly in MLX (ours and
mlx-lm's on shared arrays), and `generate_step`'s loop, timed: what the speed benchmarks share."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from hunyuan_mlx.models import FastPaths, HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
from hunyuan_mlx.models.fast_paths import using
from hunyuan_mlx.models.quantization import apply_quantization

# A copy of the release config.json (../shared does not travel to the GPU machine).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "hunyuan_a13b_config.json"
GB = 1e9
# Random embeddings (and the tied head) this many times a linear's weight scale: the tokens stay
# distinguishable after attention, whose random outputs are much alike across tokens.
EMBED_SCALE = 4.0
PER_LAYER_LISTS = ("moe_topk", "moe_intermediate_size", "num_shared_expert", "num_experts")


def log(record: dict, sink) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if sink is not None:
        sink.write(line + "\n")
        sink.flush()


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers ("1,4,16"; "" for none)."""
    try:
        return [int(part) for part in text.split(",")] if text else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of `reps` evaluated calls of `fn`, each between two synchronisations
    (warm it first)."""
    times = []
    for _ in range(reps):
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e3


def release_config(args) -> dict:
    """The release config.json, shrunk to `--layers` layers and widths times `--width-scale`."""
    cfg = json.loads(Path(args.config).read_text())
    layers = args.layers or cfg["num_hidden_layers"]
    s = args.width_scale

    def scaled(v: int, multiple: int) -> int:
        return max(multiple, int(round(v * s / multiple)) * multiple)

    cfg["num_hidden_layers"] = layers
    for key in PER_LAYER_LISTS:
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][:layers]
    if s != 1:
        head_dim = cfg.get("attention_head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        heads = max(1, round(cfg["num_attention_heads"] * s))
        kv_heads = max(1, round(cfg["num_key_value_heads"] * s))
        while heads % kv_heads:
            kv_heads -= 1
        cfg["num_attention_heads"], cfg["num_key_value_heads"] = heads, kv_heads
        cfg["hidden_size"] = heads * head_dim  # mlx-lm derives head_dim from hidden / heads
        cfg["intermediate_size"] = scaled(cfg["intermediate_size"], args.group_size)
        mis = cfg["moe_intermediate_size"]
        cfg["moe_intermediate_size"] = (
            [scaled(v, args.group_size) for v in mis]
            if isinstance(mis, list)
            else scaled(mis, args.group_size)
        )
    if args.experts:
        cfg["num_experts"] = args.experts
    if args.vocab:
        cfg["vocab_size"] = args.vocab
    return cfg


def quantization_dict(args) -> dict:
    q = {"group_size": args.group_size, "bits": args.bits, "mode": "affine"}
    if args.recipe == "mixed":
        # Attention and the shared expert at 8 bits, the routed experts and the head as --bits.
        for i in range(args._layers):
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                q[f"model.layers.{i}.self_attn.{p}"] = {"bits": 8}
            for p in ("gate_proj", "up_proj", "down_proj"):
                q[f"model.layers.{i}.mlp.shared_mlp.{p}"] = {"bits": 8}
    return q


def random_words(shape: tuple[int, ...]) -> mx.array:
    """uint32 words whose every bit is uniformly random: packed random quantized values.

    Two 16-bit halves: MLX's `randint` over the whole int32 range draws through float32, whose
    24-bit mantissa leaves the low bits biased (4-bit values averaged 5.6-6.0, not 7.5), which gave
    every random weight matrix a mean, every token the same hidden state after attention, and
    every token the same 8 experts.
    """
    low = mx.random.randint(0, 2**16, shape, dtype=mx.uint32)
    return low | (mx.random.randint(0, 2**16, shape, dtype=mx.uint32) << 16)


def random_quantized(module: nn.Module, dtype, in_scale: float = 1.0) -> None:
    """Give a quantized module random packed weights and sane scales/biases (w ~ U(-a, a))."""
    bits, gs = module.bits, module.group_size
    shape = module.weight.shape
    in_dims = shape[-1] * 32 // bits
    a = in_scale / math.sqrt(in_dims)
    levels = 2**bits - 1
    module.weight = random_words(shape)
    sshape = (*shape[:-1], in_dims // gs)
    scales = (2 * a / levels) * mx.random.uniform(0.75, 1.25, sshape)
    module.scales = scales.astype(dtype)
    module.biases = (-scales * levels / 2 + mx.random.uniform(-0.1 * a, 0.1 * a, sshape)).astype(
        dtype
    )


def fill_random(model: nn.Module, prefix: str, dtype, embed_scale: float) -> None:
    """Random weights for every parameter under `model` (a layer or the top)."""
    for name, m in model.named_modules():
        if "scales" in m:
            random_quantized(m, dtype, embed_scale if "embed_tokens" in f"{prefix}{name}" else 1.0)
        elif isinstance(m, nn.RMSNorm):
            m.weight = mx.ones(m.weight.shape, dtype=dtype)
        elif isinstance(m, nn.Linear) and "weight" in m:  # the router, kept float32
            d = m.weight.shape[-1]
            m.weight = mx.random.normal(m.weight.shape, dtype=mx.float32) / math.sqrt(d)


def build_ours(
    cfg_dict: dict, args, split: Callable[[HunYuanMoEV1ForCausalLM], None] | None = None
) -> HunYuanMoEV1ForCausalLM:
    """The random quantized model, evaluated a layer at a time; `split` (a rank's sharding) runs
    on the still-lazy weights first, so a rank only ever holds its share plus one layer's."""
    config = HunYuanMoEV1Config.from_dict(cfg_dict)
    model = HunYuanMoEV1ForCausalLM(config)  # lazy random init, never evaluated
    apply_quantization(model, quantization_dict(args))
    dtype = mx.bfloat16 if args.dtype == "bfloat16" else mx.float16
    for i, layer in enumerate(model.model.layers):
        fill_random(layer, f"model.layers.{i}.", dtype, args.embed_scale)
    model.model.embed_tokens.freeze()
    fill_random(model.model.embed_tokens, "model.embed_tokens", dtype, args.embed_scale)
    model.model.norm.weight = mx.ones(model.model.norm.weight.shape, dtype=dtype)
    if split is not None:
        split(model)
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def build_eval(args, dtype: mx.Dtype | None) -> tuple[HunYuanMoEV1ForCausalLM, dict]:
    """`build_ours`'s model of `args`'s shape, cast to `dtype` (None: as built), in eval mode,
    and its config."""
    cfg = release_config(args)
    args._layers = cfg["num_hidden_layers"]
    model = build_ours(cfg, args)
    if dtype is not None:
        model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model, cfg


QSUFFIX = ("weight", "scales", "biases")
PLACEHOLDER = mx.zeros((1,), dtype=mx.uint32)


def build_mlxlm(cfg_dict: dict, ours: HunYuanMoEV1ForCausalLM, args):
    """mlx-lm's model, quantized the same way, pointing at `ours`' arrays (experts: see switch)."""
    from mlx_lm.models import hunyuan

    model = hunyuan.Model(hunyuan.ModelArgs.from_dict(cfg_dict))
    quant = quantization_dict(args)

    def predicate(path, m):
        if not hasattr(m, "to_quantized") or path.endswith("gate.wg"):
            return False
        entry = quant.get(path, {})
        return {
            "group_size": entry.get("group_size", quant["group_size"]),
            "bits": entry.get("bits", quant["bits"]),
        }

    nn.quantize(model, class_predicate=predicate)
    mapped = {}
    for k, v in tree_flatten(ours.parameters()):
        if ".mlp.experts.gate_up_proj." in k:
            continue
        mapped[k.replace(".mlp.experts.down_proj.", ".mlp.switch_mlp.down_proj.")] = v
    theirs = dict(tree_flatten(model.parameters()))
    missing = set(theirs) - set(mapped)
    expected_missing = {
        k for k in theirs if ".switch_mlp.gate_proj." in k or ".switch_mlp.up_proj." in k
    }
    if missing != expected_missing or set(mapped) - set(theirs):
        raise RuntimeError(
            f"name mapping mismatch: missing {sorted(missing - expected_missing)[:5]}, "
            f"extra {sorted(set(mapped) - set(theirs))[:5]}"
        )
    for k in expected_missing:
        mapped[k] = PLACEHOLDER
    model.update(tree_unflatten(list(mapped.items())))
    return model


class ExpertLayout:
    """Moves each layer's gate/up expert weights between the two models' layouts, exactly."""

    def __init__(self, ours, theirs):
        self.ours, self.theirs, self.active = ours, theirs, "ours"

    def activate(self, which: str) -> None:
        if which == self.active:
            return
        for lo, lt in zip(self.ours.model.layers, self.theirs.model.layers):
            if "gate" not in lo.mlp:
                continue
            fused = lo.mlp.experts.gate_up_proj
            gate, up = lt.mlp.switch_mlp.gate_proj, lt.mlp.switch_mlp.up_proj
            inter = lo.mlp.experts.intermediate_size
            for s in QSUFFIX:
                if which == "mlxlm":
                    a = getattr(fused, s)
                    g, u = mx.contiguous(a[:, :inter]), mx.contiguous(a[:, inter:])
                    mx.eval(g, u)
                    setattr(gate, s, g)
                    setattr(up, s, u)
                    setattr(fused, s, PLACEHOLDER)
                else:
                    a = mx.concatenate([getattr(gate, s), getattr(up, s)], axis=1)
                    mx.eval(a)
                    setattr(fused, s, a)
                    setattr(gate, s, PLACEHOLDER)
                    setattr(up, s, PLACEHOLDER)
                del a
        mx.clear_cache()
        self.active = which


def prefill(model, prompt: mx.array, cache: list, prefill_step: int) -> mx.array:
    """`generate_step`'s prefill: all but the last prompt token, in chunks of `prefill_step`,
    the cache evaluated per chunk; returns the last token (the first decode step's input)."""
    p = prompt
    while p.size > 1:
        n = min(prefill_step, p.size - 1)
        model(p[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        p = p[n:]
        mx.clear_cache()
    return p


def generate(model, prompt: mx.array, n_gen: int, prefill_step: int) -> dict:
    """`mlx_lm.generate.generate_step`'s loop, greedy, timed: prefill, then decode."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    p = prefill(model, prompt, cache, prefill_step)

    def step(tok):
        logits = model(tok[None], cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return mx.argmax(logprobs, axis=-1), logprobs

    y, logprobs = step(p)
    mx.async_eval(y, logprobs)
    mx.eval(y)
    t1 = time.perf_counter()
    prefill_peak = mx.get_peak_memory()
    first_logprobs = logprobs
    mx.reset_peak_memory()
    tokens = []
    t2 = time.perf_counter()
    for _ in range(n_gen):
        next_y, next_logprobs = step(y)
        mx.async_eval(next_y, next_logprobs)
        tokens.append(y.item())
        y = next_y
    t3 = time.perf_counter()
    decode_peak = mx.get_peak_memory()
    kv_bytes = sum(c.nbytes for c in cache)
    return {
        "prefill_s": t1 - t0,
        "decode_s": t3 - t2,
        "prefill_tps": prompt.size / (t1 - t0),
        "decode_tps": n_gen / (t3 - t2),
        "prefill_peak_gb": prefill_peak / GB,
        "decode_peak_gb": decode_peak / GB,
        "kv_gb": kv_bytes / GB,
        "tokens": tokens,
        "first_logprobs": first_logprobs,
    }


def policies(default: FastPaths | None = None) -> dict[str, FastPaths]:
    """The policies the speed benchmarks compare, by name: `default` (this backend's, or the one
    given: `--fast-paths`), `plain` (fast paths off), and the default with each layer's compiled
    decode step (`layer`) or with the whole model's decode step as one compiled graph (`graph`)."""
    default = default or FastPaths.default()
    return {
        "default": default,
        "plain": FastPaths.off(),
        "layer": dataclasses.replace(default, decode_graph=False),
        "graph": dataclasses.replace(default, decode_graph=True),
    }


def plain_paths(model: HunYuanMoEV1ForCausalLM):
    """Context manager turning this project's fast paths off in `model`."""
    return using(model, FastPaths.off())


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("mlx", "mlx-lm", "mlx-cuda-13", "mlx-metal"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["mlx_core"] = getattr(mx, "__version__", None)
    # MLX's tuning variables (MLX_MAX_OPS_PER_BUFFER, ...) change what a run measures.
    out["mlx_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")}
    return out


def device_name() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return f"{mx.default_device()} {info.get('device_name', '')} {info.get('architecture', '')}"


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options that shape the random model, shared by the benchmarks that build it."""
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--layers", type=int, default=0, help="0: the release's 32")
    ap.add_argument("--width-scale", type=float, default=1.0, help="scales hidden, heads, MLPs")
    ap.add_argument("--experts", type=int, default=0, help="0: the release's 64")
    ap.add_argument("--vocab", type=int, default=0, help="0: the release's 128167")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--recipe", choices=("uniform", "mixed"), default="uniform")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument(
        "--embed-scale", type=float, default=EMBED_SCALE, help="embedding/head value scale"
    )
    ap.add_argument("--prefill-step", type=int, default=2048, help="generate_step's default")
    ap.add_argument("--seed", type=int, default=0)
