"""Hunyuan-A13B within a memory budget: routed experts streamed from disk (issue 23), measured.

`write` makes a full A13B-shape 4-bit checkpoint (about 45 GB) from random weights, drawn with
`a13b.py`'s generator one decoder layer at a time (one shard each), so the writer holds one
layer (1.4 GB) at a time; the folder appears whole or not at all.

`run` loads it with `--memory-budget`s below its size, in one subprocess per budget (so each
peak RSS is that budget's alone), and drives the loaded model through `generate_step`'s loop
(`a13b.generate`): prefill tokens/s at `--prompt-len` tokens, decode tokens/s, the expert
cache's hit rate and bytes read per token, the prefetch guess's precision, and the process's
peak RSS. `--zipf S` replaces every router's weights so that expert e's logit is raised by
`S * log(1 / (e + 1))`-shaped bias (a synthetic Zipf routing, see `skew_routers`): random
weights route almost uniformly, the worst case for a cache. The disk's read speed is measured
on one shard, cold when the page cache can be dropped (root), else said to be warm.

One JSON line per measurement on stdout and in `--out`:

    python -m benchmarks.bench_stream write --path /work/a13b-4bit-random
    python -m benchmarks.bench_stream run --path /work/a13b-4bit-random --budgets 8GB,12GB,16GB \
        --out benchmarks/results/DATE_cpu_stream.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks.a13b import GB, add_model_args, fill_random, quantization_dict, release_config
from hunyuan_mlx.files import INDEX_FILE, staged_output
from hunyuan_mlx.models import HunYuanMoEV1Config
from hunyuan_mlx.models.hunyuan import HunYuanMoEV1DecoderLayer
from hunyuan_mlx.models.quantization import apply_quantization

SHARD = "model-{:05d}-of-{:05d}.safetensors"


def quantized(module, prefix: str, cfg_dict: dict, args) -> dict[str, mx.array]:
    """`module`'s parameters (quantized as the benchmark model is, random), named from `prefix`,
    evaluated."""
    quant = quantization_dict(args)
    apply_quantization(module, {k: v for k, v in quant.items() if "." not in k})
    dtype = mx.bfloat16 if args.dtype == "bfloat16" else mx.float16
    fill_random(module, prefix, dtype, args.embed_scale)
    params = {prefix + name: p for name, p in tree_flatten(module.parameters())}
    mx.eval(params)
    return params


def write(args) -> None:
    """The random A13B-shape checkpoint at `args.path`: config.json, one shard per layer, one for
    the embedding and final norm, and the index."""
    import mlx.nn as nn

    args._layers = 0
    cfg = release_config(args)
    args._layers = cfg["num_hidden_layers"]
    cfg["quantization"] = {"group_size": args.group_size, "bits": args.bits, "mode": "affine"}
    config = HunYuanMoEV1Config.from_dict(cfg)
    mx.random.seed(args.seed)
    count = config.num_hidden_layers + 1
    weight_map, total = {}, 0
    with staged_output(Path(args.path), force=args.force) as out:
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        for i in range(config.num_hidden_layers):
            tic = time.perf_counter()
            layer = HunYuanMoEV1DecoderLayer(config, i)
            params = quantized(layer, f"model.layers.{i}.", cfg, args)
            name = SHARD.format(i + 1, count)
            mx.save_safetensors(str(out / name), params, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(params, name))
            total += sum(p.nbytes for p in params.values())
            print(f"layer {i}: {time.perf_counter() - tic:.1f} s, {total / GB:.1f} GB", flush=True)
            del layer, params
        top = nn.Module()
        top.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        top.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        params = quantized(top, "model.", cfg, args)
        name = SHARD.format(count, count)
        mx.save_safetensors(str(out / name), params, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(params, name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the random A13B-shape checkpoint")
    add_model_args(w)
    w.add_argument("--path", required=True)
    w.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if args.command == "write":
        write(args)


if __name__ == "__main__":
    main()
