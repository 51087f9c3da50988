"""Peak memory of the converter on a synthetic multi-shard checkpoint several times its bound.

Writes a bf16 checkpoint with the release's tensor names (per-expert tensors, experts of a layer
spread over shards, a tied `lm_head.weight`), converts it in a child process per measurement and
prints one JSON line each: the child's peak RSS, the RSS of a child that only imports the
converter (baseline), and the stated bound: one input shard + one output shard + one layer's
stacked experts.

    python -m benchmarks.convert_memory [--layers 12 --experts 16 --hidden 2048 --width 1536]
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.synthetic import release_config, write_checkpoint

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
