"""Hunyuan-A13B within a memory budget: routed experts streamed from disk (issue 23), measured.

`write` makes a full A13B-shape 4-bit checkpoint (about 45 GB) from random weights, drawn with
`a13b.py`'s generator one decoder layer at a time (one shard each), so the writer holds one
layer (1.4 GB) at a time; the folder appears whole or not at all.

`run` loads it with `--memory-budget`s below its size, in one subprocess per budget (so each
peak RSS is that budget's alone), and drives the loaded model through `generate_step`'s loop
(`a13b.generate`): prefill tokens/s at `--prompt-len` tokens, decode tokens/s, the expert
cache's hit rate and bytes read per token, the prefetch guess's precision, and the process's
peak RSS and MLX's peak memory (`--memory-limit` also caps MLX's memory at the budget, as on a
GPU). `--zipf S` replaces every router's weights so that expert e's logit is raised by
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
import os
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from benchmarks.a13b import (
    GB,
    add_model_args,
    device_name,
    fill_random,
    log,
    prefill,
    quantization_dict,
    release_config,
    versions,
)
from hunyuan_mlx.cli import run_main
from hunyuan_mlx.files import INDEX_FILE, parse_size, staged_output
from hunyuan_mlx.interrupts import signals_as_interrupts
from hunyuan_mlx.loading import load_model
from hunyuan_mlx.models import HunYuanMoEV1Config
from hunyuan_mlx.models.hunyuan import HunYuanMoEV1DecoderLayer
from hunyuan_mlx.models.quantization import apply_quantization
from hunyuan_mlx.streaming import READER_THREADS, expert_store

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


def drop_page_cache() -> bool:
    """Empty the OS page cache (root on Linux), so that reads come from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def disk_read_speed(path: Path, total: int, block: int) -> dict:
    """GB/s reading `total` bytes of `path`'s shards in `block`-sized ranges at random places
    (as the expert store reads: `READER_THREADS` at once), after dropping the page cache."""
    cold = drop_page_cache()
    shards = sorted(path.glob("model-*.safetensors"))[:-1]  # the layers' shards
    rng = random.Random(0)
    ranges = []
    for _ in range(total // block):
        file = rng.choice(shards)
        # A shard smaller than a block (a small test checkpoint) is read whole from its start.
        ranges.append((file, rng.randrange(0, max(1, file.stat().st_size - block))))

    def read(place: tuple[Path, int]) -> int:
        fd = os.open(place[0], os.O_RDONLY)
        try:
            return len(os.pread(fd, block, place[1]))
        finally:
            os.close(fd)

    tic = time.perf_counter()
    with ThreadPoolExecutor(READER_THREADS) as pool:
        done = sum(pool.map(read, ranges))
    seconds = time.perf_counter() - tic
    return {"measurement": "disk_read", "gbps": done / seconds / GB, "bytes": done,
            "block_bytes": block, "threads": READER_THREADS, "page_cache": page_cache(cold)}


def page_cache(cold: bool) -> str:
    return "dropped" if cold else "warm (could not drop it)"


class SkewedGate(nn.Module):
    """A router whose logits get `bias`: a synthetic Zipf routing over random weights."""

    def __init__(self, gate: nn.Module, bias: mx.array):
        super().__init__()
        self.gate = gate
        self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        return self.gate(x) + self.bias


def skew_routers(model, exponent: float, seed: int) -> None:
    """Add `exponent * log(1 / rank)` to each expert's router logit, the ranks a random
    permutation per layer: Zipf-distributed preferences (rank r favoured as r^-exponent) on top
    of the random logits, so each layer has its own few hot experts."""
    store = expert_store(model)
    rng = np.random.default_rng(seed)
    for i, layer in enumerate(model.model.layers):
        num_experts = layer.mlp.num_experts
        ranks = rng.permutation(num_experts) + 1
        bias = mx.array(-exponent * np.log(ranks), dtype=mx.float32)
        layer.mlp.gate = SkewedGate(layer.mlp.gate, bias)
        store.routers[i] = layer.mlp.gate


def rss_gb(peak: bool) -> float:
    """The process's peak resident set (ru_maxrss), or its current one, in GB."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def phase(store, before: Counter, seconds: float, tokens: int) -> dict:
    """One phase's speed and cache figures from the store's counters since `before`."""
    d = store.stats - before
    return {
        "tokens": tokens,
        "tps": tokens / seconds,
        "seconds": seconds,
        "hit_rate": d["hits"] / max(1, d["needed"]),
        "bytes_read_per_token_gb": d["bytes_read"] / tokens / GB,
        "read_gbps": d["bytes_read"] / seconds / GB,
        "prefetch_precision": d["guessed_right"] / max(1, d["guessed"]),
        "reads_prefetched": d["prefetched"] / max(1, d["reads"]),
        "wasted_reads": d["wasted_reads"],
        "experts_needed": d["needed"],
    }


def measure(args) -> None:
    """One budget: load, prefill `--prompt-len` tokens in one chunk, decode `--gen` tokens
    greedily; one JSON line (run in its own process by `run`)."""
    from mlx_lm.models.cache import make_prompt_cache

    baseline = rss_gb(peak=False)
    cold = drop_page_cache()
    if args.memory_limit:
        mx.set_memory_limit(parse_size(args.budget))
    tic = time.perf_counter()
    model = load_model(args.path, memory_budget=args.budget)
    load_s = time.perf_counter() - tic
    store = expert_store(model)
    if args.zipf:
        skew_routers(model, args.zipf, args.seed)
    after_load = rss_gb(peak=False)
    mx.random.seed(args.seed)
    prompt = mx.random.randint(0, model.config.vocab_size, (args.prompt_len + 1,))
    cache = make_prompt_cache(model)
    before = Counter(store.stats)
    tic = time.perf_counter()
    y = prefill(model, prompt, cache, args.prompt_len)
    prefill_s = time.perf_counter() - tic
    prefill_stats = phase(store, before, prefill_s, args.prompt_len)
    # The first step (the last prompt token) and the decode steps after it.
    tokens = []
    times = []
    before = Counter(store.stats)
    for step in range(args.gen + 1):
        if step == 1:
            before = Counter(store.stats)
        tic = time.perf_counter()
        logits = model(y[None], cache=cache)[:, -1, :]
        y = mx.argmax(logits, axis=-1)
        tokens.append(y.item())
        times.append(time.perf_counter() - tic)
    decode_stats = phase(store, before, sum(times[1:]), args.gen)
    usage = Counter(k[1] for k in store.uses.elements()) if args.zipf else None
    record = {
        "measurement": "stream_generate",
        "budget_gb": parse_size(args.budget) / GB,
        "routing": f"zipf s={args.zipf}" if args.zipf else "random weights (near uniform)",
        "cache_capacity_gb": store.capacity / GB,
        "expert_gb": store.expert_bytes(0) / GB,
        "load_s": load_s,
        "prefill": prefill_stats,
        "decode": decode_stats,
        "tokens": tokens,
        "baseline_rss_gb": baseline,
        "rss_after_load_gb": after_load,
        "peak_rss_gb": rss_gb(peak=True),
        "mlx_peak_gb": mx.get_peak_memory() / GB,
        "mlx_memory_limit_gb": parse_size(args.budget) / GB if args.memory_limit else None,
        "page_cache": page_cache(cold),
        "prefill_step": args.prompt_len,
        "device": device_name(),
        **({"top8_share_layer0": top_share(store, 8)} if usage is not None else {}),
        "versions": versions(),
    }
    print(json.dumps(record), flush=True)


def top_share(store, n: int) -> float:
    """Share of layer 0's expert uses that went to its `n` most used experts."""
    counts = sorted((c for (layer, _), c in store.uses.items() if layer == 0), reverse=True)
    return sum(counts[:n]) / max(1, sum(counts))


def run(args) -> None:
    """The disk's read speed, then one process per budget (and the Zipf run), logged."""
    path = Path(args.path)
    sink = open(args.out, "a") if args.out else None
    expert = 21_233_664  # one A13B expert at 4 bits, group 64, bf16 scales and biases
    log(disk_read_speed(path, args.disk_bytes, expert), sink)
    runs = [(b, 0.0) for b in args.budgets.split(",")]
    runs += [(b, args.zipf) for b in args.zipf_budgets.split(",") if b]
    for budget, zipf in runs:
        command = [sys.executable, "-m", "benchmarks.bench_stream", "measure", "--path",
                   str(path), "--budget", budget, "--prompt-len", str(args.prompt_len),
                   "--gen", str(args.gen), "--zipf", str(zipf), "--seed", str(args.seed),
                   *(["--memory-limit"] if args.memory_limit else [])]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            log({"measurement": "stream_generate", "budget": budget, "zipf": zipf,
                 "error": out.stderr.strip().splitlines()[-1:]}, sink)
            continue
        log(json.loads(out.stdout.strip().splitlines()[-1]), sink)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the random A13B-shape checkpoint")
    add_model_args(w)
    w.add_argument("--path", required=True)
    w.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="the disk's speed, then generate under each budget")
    r.add_argument("--path", required=True)
    r.add_argument("--budgets", default="8GB,12GB,16GB")
    r.add_argument("--zipf", type=float, default=1.2, help="the skewed runs' Zipf exponent")
    r.add_argument("--zipf-budgets", default="8GB", help="budgets of the skewed runs")
    r.add_argument("--disk-bytes", type=int, default=4 * 10**9)
    r.add_argument("--out", default=None)
    for p in (r, m := sub.add_parser("measure", help="one budget (run starts it)")):
        p.add_argument("--prompt-len", type=int, default=512)
        p.add_argument("--gen", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--memory-limit",
            action="store_true",
            help="also cap MLX's memory at the budget (mx.set_memory_limit): on a GPU, whose "
            "memory the process's RSS does not show",
        )
    m.add_argument("--path", required=True)
    m.add_argument("--budget", required=True)
    m.add_argument("--zipf", type=float, default=0.0)
    args = ap.parse_args()
    {"write": write, "run": run, "measure": measure}[args.command](args)


if __name__ == "__main__":
    # Ctrl-C, SIGTERM and SIGHUP end it in one line, as this project's commands do.
    with run_main("bench_stream"), signals_as_interrupts():
        main()
