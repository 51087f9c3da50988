"""Peak memory of the converter on a synthetic multi-shard checkpoint several times its bound.

Writes a bf16 checkpoint with the release's tensor names (per-expert tensors, experts of a layer
spread over shards, a tied `lm_head.weight`), converts it in a child process per measurement and
prints one JSON line each: the child's peak RSS, the RSS of a child that only imports the
converter (baseline), and the stated bound: one input shard + one output shard + one layer's
stacked experts.

    python benchmarks/convert_memory.py [--layers 12 --experts 16 --hidden 2048 --width 1536]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
# The child's own peak: VmHWM restarts at exec, whereas ru_maxrss starts from the parent's RSS at
# fork; on macOS (no /proc) ru_maxrss is in bytes and posix_spawn does not inherit it.
CHILD = """
import json, resource, sys
from pathlib import Path
from hunyuan_mlx.converter import convert
args = json.loads(sys.argv[1])
if args is not None:
    convert(**args)
status = Path("/proc/self/status")
if status.exists():
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
    peak_mb = int(line.split()[1]) / 1024
else:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"peak_rss_mb": peak_mb}))
"""


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


def child_peak_rss(convert_kwargs: dict | None) -> tuple[float, float]:
    """Run a conversion (or only the imports) in a child; (its peak RSS in MB, seconds)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(convert_kwargs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=200, help="input and output shard size")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    config = release_config(args.layers, args.experts, args.hidden, args.width, args.vocab)
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="convert_memory."))
    try:
        src = workdir / "src"
        # Written in a child, so that this process stays small.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            files = pool.submit(write_checkpoint, src, config, args.shard_mb * MB).result()
        checkpoint_mb = sum(f.stat().st_size for f in files) / MB
        layer_experts_mb = args.experts * 3 * args.width * args.hidden * 2 / MB
        bound_mb = max(f.stat().st_size for f in files) / MB + args.shard_mb + layer_experts_mb
        baseline_mb, _ = child_peak_rss(None)
        runs = {
            "bfloat16": {},
            "4bit": {"quantize": True},
            "mixed_8": {"quantize": True, "quant_recipe": "mixed_8"},
        }
        for label, kwargs in runs.items():
            dst = workdir / label
            peak_mb, seconds = child_peak_rss(
                {
                    "hf_path": str(src),
                    "mlx_path": str(dst),
                    "max_shard_size": f"{args.shard_mb}MiB",
                    **kwargs,
                }
            )
            record = {
                "run": label,
                "checkpoint_mb": round(checkpoint_mb),
                "input_shards": len(files),
                "output_shards": len(list(dst.glob("*.safetensors"))),
                "layer_experts_mb": round(layer_experts_mb),
                "bound_mb": round(bound_mb),
                "baseline_rss_mb": round(baseline_mb),
                "peak_rss_mb": round(peak_mb),
                "peak_above_baseline_mb": round(peak_mb - baseline_mb),
                "checkpoint_over_bound": round(checkpoint_mb / bound_mb, 2),
                "seconds": round(seconds, 1),
            }
            print(json.dumps(record), flush=True)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
