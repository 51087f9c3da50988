"""Speed and memory of one model over several ranks (issue 12): tensor and pipeline mode.

Builds the Hunyuan-A13B-shaped random quantized model of `a13b.py` on every rank, split for the
rank before any weight is evaluated (every rank draws the same random weights, so the ranks hold
one consistent model), then times `generate_step`'s loop as `bench_generate` does: prefill
tokens/s at each `--prompt-lens`, decode tokens/s over `--gen` tokens (each after an untimed
warm-up run of the same prompt; `--rounds` timed runs, medians in a last "summary" line per
prompt), and each rank's peak memory
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

In tensor mode the run also times the link (`all_sum` of a decode token's hidden state, alone and
as a chain of one token's 64, and of prefill chunks), and `--no-all-sums` times the same model
with its all_sums dropped, in turn with it in each round: each rank's output is then a partial
sum, so the text is wrong; what is left is the compute alone, a diagnostic:

    mlx.launch --backend nccl -n 2 -- python -m benchmarks.bench_distributed \\
        --no-all-sums --rounds 3

Whole experts per rank (expert parallel) against each expert's width split was measured with
this script at commit 51b534b (`--variants width,whole`), where that variant lives.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator

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
    median_ms,
    release_config,
    versions,
)
from hunyuan_mlx.distributed import init_group, make_plan
from hunyuan_mlx.models import HunYuanMoEV1Config

# --tiny: 2 layers of a quarter-width A13B (8 heads, 2 KV heads, hidden 1024), 16 experts,
# a 4096-token vocabulary; prompts and decode short enough for a 2-core CPU.
TINY = dict(layers=2, width_scale=0.25, experts=16, vocab=4096, prompt_lens="32,128", gen=8)
LINK_REPS = 20


def per_rank(group: mx.distributed.Group, value: float) -> list[float]:
    """`value` of every rank, in rank order (every rank gets the list; `all_sum` of one-hot rows,
    which every backend has)."""
    row = np.zeros(group.size(), np.float32)
    row[group.rank()] = value
    if group.size() == 1:
        return row.tolist()
    return np.array(mx.distributed.all_sum(mx.array(row), group=group)).tolist()


@contextlib.contextmanager
def without_all_sums(model, compiled: dict) -> Iterator[None]:
    """The `--no-all-sums` diagnostic: tensor mode without its collectives (wrong output). The
    compiled decode steps hold the all_sums they were traced with, so each state keeps its own
    (`compiled`, kept between calls)."""
    saved = []
    for layer in model.layers:
        saved.append((layer.self_attn.sharding_group, layer.mlp.sharding_group, layer._decode_fns))
        layer.self_attn.sharding_group = layer.mlp.sharding_group = None
        layer._decode_fns = compiled.get(id(layer))
    try:
        yield
    finally:
        for layer, (attn_group, moe_group, fns) in zip(model.layers, saved):
            compiled[id(layer)] = layer._decode_fns
            layer.self_attn.sharding_group, layer.mlp.sharding_group = attn_group, moe_group
            layer._decode_fns = fns


def link_records(group: mx.distributed.Group, hidden: int, dtype: mx.Dtype, layers: int):
    """Milliseconds of the link's `all_sum` (median of `LINK_REPS`) on a decode token's hidden
    state, on a chain of one token's 2 x `layers` of them (each depending on the last, as in a
    decode step), and on prefill chunks of 512 and 4096 tokens."""

    def chain(x: mx.array) -> mx.array:
        for _ in range(2 * layers):
            x = mx.distributed.all_sum(x, group=group) * 0.5
        return x

    cases = {
        "token": (lambda x: mx.distributed.all_sum(x, group=group), 1),
        f"token_chain_{2 * layers}": (chain, 1),
        "prefill_512": (lambda x: mx.distributed.all_sum(x, group=group), 512),
        "prefill_4096": (lambda x: mx.distributed.all_sum(x, group=group), 4096),
    }
    for name, (fn, tokens) in cases.items():
        x = mx.ones((1, tokens, hidden), dtype)
        mx.eval(fn(x))  # warm-up
        ms = median_ms(lambda fn=fn, x=x: fn(x), LINK_REPS)
        yield {"kind": "all_sum", "case": name, "bytes": x.nbytes, "ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--pipeline", action="store_true", help="layers split (default: tensor)")
    ap.add_argument(
        "--no-all-sums",
        action="store_true",
        help="tensor mode: also time the model without its all_sums (module doc)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="timed runs of each prompt")
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
    cfg = release_config(args)
    args._layers = cfg["num_hidden_layers"]
    mode = "single" if group.size() == 1 else "pipeline" if args.pipeline else "tensor"
    variants = [mode] + (["tensor-no-all-sums"] if args.no_all_sums and mode == "tensor" else [])
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
            model.shard(group)
        else:
            model.model.pipeline(group)

    t = time.perf_counter()
    mx.random.seed(args.seed)  # the same on every rank: one consistent model
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
    if mode == "tensor":
        hidden, dtype = cfg["hidden_size"], mx.bfloat16 if args.dtype == "bfloat16" else mx.float16
        for record in link_records(group, hidden, dtype, cfg["num_hidden_layers"]):
            if first:
                log({**record, **head}, sink)

    no_sum_steps = {}

    def run(variant: str, prompt: mx.array) -> dict:
        if variant != "tensor-no-all-sums":
            return generate(model, prompt, args.gen, args.prefill_step)
        with without_all_sums(model, no_sum_steps):
            return generate(model, prompt, args.gen, args.prefill_step)

    mx.random.seed(args.seed + 1)
    lengths = [int(n) for n in args.prompt_lens.split(",")]
    prompts = {n: mx.random.randint(0, cfg["vocab_size"], (n,)) for n in lengths}
    results = {}
    for prompt in prompts.values():
        for variant in variants:  # warm-up: kernels compile at first
            run(variant, prompt)
    for r in range(args.rounds):
        for prompt_len, prompt in prompts.items():
            for variant in variants:
                out = run(variant, prompt)
                record = {
                    "kind": "generate",
                    **head,
                    "variant": variant,
                    "round": r,
                    "prompt_tokens": prompt_len,
                    "gen_tokens": args.gen,
                    "prefill_tps": out["prefill_tps"],
                    "decode_tps": out["decode_tps"],
                    "prefill_peak_gb_per_rank": per_rank(group, out["prefill_peak_gb"]),
                    "decode_peak_gb_per_rank": per_rank(group, out["decode_peak_gb"]),
                    "kv_gb_per_rank": per_rank(group, out["kv_gb"]),
                    "tokens": out["tokens"],
                }
                results.setdefault((variant, prompt_len), []).append(record)
                if first:
                    log(record, sink)
    for (variant, prompt_len), records in results.items():
        summary = {
            "kind": "summary",
            **head,
            "variant": variant,
            "prompt_tokens": prompt_len,
            "rounds": len(records),
            "prefill_tps_median": statistics.median(r["prefill_tps"] for r in records),
            "decode_tps_median": statistics.median(r["decode_tps"] for r in records),
        }
        if first:
            log(summary, sink)


if __name__ == "__main__":
    main()
