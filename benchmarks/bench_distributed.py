"""Speed and memory of one model over several ranks (issue 12): tensor and pipeline mode.

Builds the Hunyuan-A13B-shaped random quantized model of `a13b.py` on every rank, split for the
rank before any weight is evaluated (every rank draws the same random weights, so the ranks hold
one consistent model), then times `generate_step`'s loop as `bench_generate` does: prefill
tokens/s at each `--prompt-lens`, decode tokens/s over `--gen` tokens (each after an untimed
warm-up run of the same prompt), and each rank's peak memory
(`mx.get_peak_memory`, weights included) and weights. Rank 0 prints one JSON line per measurement,
with every rank's figures. Without `mlx.launch` it measures one process (the baseline).

On a 2-GPU machine (full A13B shape; 8-bit does not fit one 80 GB card):

    python -m benchmarks.bench_distributed --out $OUT/one.jsonl
    mlx.launch --backend nccl -n 2 -- python -m benchmarks.bench_distributed --out $OUT/tp.jsonl
    mlx.launch --backend nccl -n 2 -- python -m benchmarks.bench_distributed --pipeline \\
        --out $OUT/pp.jsonl
    mlx.launch --backend nccl -n 2 -- python -m benchmarks.bench_distributed --bits 8 ...

On this CPU, a reduced shape over the ring backend (`--tiny`):

    mlx.launch --backend ring -n 2 -- python -m benchmarks.bench_distributed --tiny
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from benchmarks.a13b import (
    GB,
    add_model_args,
    build_ours,
    device_name,
    generate,
    log,
    release_config,
    versions,
)
from hunyuan_mlx.distributed import init_group, make_plan
from hunyuan_mlx.models import HunYuanMoEV1Config
from hunyuan_mlx.models.sharding import keep_stage, shard_tensor

# --tiny: 2 layers of a quarter-width A13B (8 heads, 2 KV heads, hidden 1024), 16 experts,
# a 4096-token vocabulary; prompts and decode short enough for a 2-core CPU.
TINY = dict(layers=2, width_scale=0.25, experts=16, vocab=4096, prompt_lens="32,128", gen=8)


def per_rank(group: mx.distributed.Group, value: float) -> list[float]:
    """`value` of every rank, in rank order (every rank gets the list; `all_sum` of one-hot rows,
    which every backend has)."""
    row = np.zeros(group.size(), np.float32)
    row[group.rank()] = value
    if group.size() == 1:
        return row.tolist()
    return np.array(mx.distributed.all_sum(mx.array(row), group=group)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--pipeline", action="store_true", help="layers split (default: tensor)")
    ap.add_argument("--prompt-lens", default="512,4096")
    ap.add_argument("--gen", type=int, default=64, help="tokens decoded after each prompt")
    ap.add_argument("--tiny", action="store_true", help=f"a reduced shape for CPUs: {TINY}")
    ap.add_argument("--out", default=None, help="also write the JSON lines here (rank 0)")
    args = ap.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)

    group = init_group()
    first = group.rank() == 0
    sink = open(args.out, "w") if args.out and first else None
    mx.random.seed(args.seed)  # the same on every rank: one consistent model
    cfg = release_config(args)
    args._layers = cfg["num_hidden_layers"]
    mode = "single" if group.size() == 1 else "pipeline" if args.pipeline else "tensor"
    head = {
        "bench": "distributed",
        "mode": mode,
        "ranks": group.size(),
        "device": device_name(),
        "versions": versions(),
        "quant": {"bits": args.bits, "group_size": args.group_size, "recipe": args.recipe},
        "argv": sys.argv[1:],
    }

    def split(model) -> None:
        if mode == "single":
            return
        plan = make_plan(HunYuanMoEV1Config.from_dict(cfg), group, args.pipeline)
        if plan.mode == "tensor":
            shard_tensor(model, group)
        else:
            keep_stage(model, group, plan.first_layer, plan.end_layer)

    t = time.perf_counter()
    model = build_ours(cfg, args, split)
    model.eval()  # inference: the fast paths are off in training mode
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / GB
    build = {
        "kind": "build",
        **head,
        "build_s": time.perf_counter() - t,
        "weights_gb_per_rank": per_rank(group, weights),
        "peak_gb_per_rank": per_rank(group, mx.get_peak_memory() / GB),
    }
    if first:
        log(build, sink)
    mx.random.seed(args.seed + 1)
    for prompt_len in [int(n) for n in args.prompt_lens.split(",")]:
        prompt = mx.random.randint(0, cfg["vocab_size"], (prompt_len,))
        generate(model, prompt, args.gen, args.prefill_step)  # warm-up: kernels compile at first
        run = generate(model, prompt, args.gen, args.prefill_step)
        record = {
            "kind": "generate",
            **head,
            "prompt_tokens": prompt_len,
            "gen_tokens": args.gen,
            "prefill_tps": run["prefill_tps"],
            "decode_tps": run["decode_tps"],
            "prefill_peak_gb_per_rank": per_rank(group, run["prefill_peak_gb"]),
            "decode_peak_gb_per_rank": per_rank(group, run["decode_peak_gb"]),
            "kv_gb_per_rank": per_rank(group, run["kv_gb"]),
            "tokens": run["tokens"],
        }
        if first:
            log(record, sink)


if __name__ == "__main__":
    main()
