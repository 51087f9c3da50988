"""Memory and speed of `python -m hunyuan_mlx.evaluate --reference` at Hunyuan-A13B's shape.

Two random quantized models of the release's structure (the model at `--bits`, 4, the reference at
`--reference-bits`, 8) are built directly in MLX by bench_generate's builder, never as a checkpoint
(4-bit A13B is 45 GB, 8-bit about 85 GB). The evaluate command's library function,
`hunyuan_mlx.evaluation.evaluate`, gets a builder for each, so it builds and frees them in turn
exactly as it loads checkpoints, over `--windows` random windows of `--sequence-length` tokens.
Random weights say nothing about quality here; the KL is reported only as a sanity check.

One JSON line per measurement:
- `plain`: a plain forward pass (`model(inputs)`, every logit, evaluated) of each model over the
  same batches: the speed the evaluation is compared with;
- `evaluate`: the peak MLX memory over the whole evaluation against the larger model's weights
  (the target is at most +10%), the size of the reference's hidden states in their temporary
  file, and the tokens/s of the reference's pass (hidden states written) and the model's (the
  reference's log-probabilities recomputed, KL taken). The peak leaves out the random builder's
  own temporaries (its random words, up to twice a layer's weights), which loading a checkpoint
  does not have; they are reported apart, as `build_peak_gb`: the builder notes the peak so far
  before it builds, and resets it after.

Every pass is preceded by an untimed warm-up batch (kernel compilation). Examples:

    python -m benchmarks.bench_evaluate --out $OUT/evaluate.jsonl   # A13B: 8-bit needs ~90 GB
    python -m benchmarks.bench_evaluate --reference-bits 6            # A13B on an 80 GB card
    python -m benchmarks.bench_evaluate --tiny                        # a quick CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from benchmarks.a13b import (
    GB,
    add_model_args,
    build_ours,
    device_name,
    log,
    release_config,
    versions,
)
from hunyuan_mlx.evaluation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEQUENCE_LENGTH,
    batches,
    evaluate,
)

MEMORY_TARGET = 1.10  # peak within the larger model's weights + 10%
# --tiny: a shape a 2-core CPU runs in a minute (MLX's CPU quantized matmuls are slow); at this
# size activations and MLX's fixed costs outweigh the weights, so its memory ratio means nothing.
TINY = dict(layers=2, width_scale=0.0625, experts=8, vocab=2048, windows=4, sequence_length=128)


def plain_forward(model, windows: list, batch_size: int) -> float:
    """Seconds of `model(inputs)` with every logit evaluated, over the evaluation's batches."""
    start = time.perf_counter()
    for inputs, *_ in batches(windows, batch_size):
        mx.eval(model(inputs))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--reference-bits", type=int, default=8)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--sequence-length", type=int, default=DEFAULT_SEQUENCE_LENGTH)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--tiny", action="store_true", help=f"the shape {TINY}")
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    args = ap.parse_args()
    if args.tiny:
        vars(args).update(TINY)

    sink = open(args.out, "w") if args.out else None
    mx.random.seed(args.seed)
    cfg = release_config(args)
    args._layers = cfg["num_hidden_layers"]
    rng = np.random.default_rng(args.seed)
    windows = [
        (rng.integers(0, cfg["vocab_size"], args.sequence_length).tolist(), 1)
        for _ in range(args.windows)
    ]
    tokens = args.windows * args.sequence_length
    log(
        {
            "kind": "setup",
            "device": device_name(),
            "versions": versions(),
            "shape": {
                k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_experts", "vocab_size")
            },
            "bits": args.bits,
            "reference_bits": args.reference_bits,
            "windows": args.windows,
            "sequence_length": args.sequence_length,
            "batch_size": args.batch_size,
            "argv": sys.argv[1:],
        },
        sink,
    )
    weights_gb: dict[int, float] = {}
    peaks: list[int] = []  # the peak before each build
    build_peaks: list[int] = []  # each build's own

    def builder(bits: int) -> Callable[[], object]:
        """What `evaluate` calls for a model: build it at `bits`, note its weight size."""

        def build():
            peaks.append(mx.get_peak_memory())
            mx.reset_peak_memory()
            model = build_ours(cfg, argparse.Namespace(**{**vars(args), "bits": bits}))
            build_peaks.append(mx.get_peak_memory())
            mx.reset_peak_memory()
            model.eval()
            weights_gb[bits] = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / GB
            return model

        return build

    for bits in (args.bits, args.reference_bits):
        model = builder(bits)()
        plain_forward(model, windows[: args.batch_size], args.batch_size)  # warm-up
        seconds = plain_forward(model, windows, args.batch_size)
        log(
            {
                "kind": "plain",
                "bits": bits,
                "weights_gb": weights_gb[bits],
                "tokens": tokens,
                "tokens_per_sec": tokens / seconds,
            },
            sink,
        )
        del model
        mx.clear_cache()

    model, reference = builder(args.bits), builder(args.reference_bits)
    evaluate(model, windows[: args.batch_size], reference, args.batch_size)  # warm-up
    mx.clear_cache()
    mx.reset_peak_memory()
    peaks.clear()
    build_peaks.clear()
    result = evaluate(model, windows, reference, args.batch_size)
    peak_gb = max(peaks + [mx.get_peak_memory()]) / GB
    larger = max(weights_gb.values())
    log(
        {
            "kind": "evaluate",
            "bits": args.bits,
            "reference_bits": args.reference_bits,
            "tokens": tokens,
            "peak_gb": peak_gb,
            "build_peak_gb": max(build_peaks) / GB,
            "reference_disk_gb": result.reference_disk_bytes / GB,
            "larger_weights_gb": larger,
            "peak_over_weights": peak_gb / larger,
            "within_target": peak_gb <= MEMORY_TARGET * larger,
            "tokens_per_sec": result.model.tokens_per_sec,
            "reference_tokens_per_sec": result.reference.tokens_per_sec,
            "kl_mean": result.divergence.kl_mean,
            "top1_agreement": result.divergence.top1_agreement,
        },
        sink,
    )


if __name__ == "__main__":
    main()
