"""Size and agreement with the bf16 model of each quantization recipe, on a synthetic model.

The model has the release's structure (64 experts top-8, one shared expert, GQA with heads of
128, QK-norm, tied embeddings) at reduced size, with random weights scaled so that routing and
next-token distributions are far from uniform. It is written as a bf16 release-layout checkpoint,
converted once unquantized (the reference) and once per recipe; each converted model runs in
float32 over the same fixed token stream, scored by the evaluate command's code
(`hunyuan_mlx.evaluation`, which keeps the reference's hidden states and head: exact KL). One
JSON line per recipe: size on disk, bits per weight, top-1 agreement with the bf16 model and the
mean KL(bf16 || quantized) of the next-token distributions.

    python -m benchmarks.quant_quality [--layers 4 --hidden 512 --width 384 --tokens 512]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from benchmarks.synthetic import release_config, write_checkpoint
from hunyuan_mlx.converter import convert
from hunyuan_mlx.evaluation import Reference, divergence, score
from hunyuan_mlx.loading import load_model

# label -> convert() quantization arguments
RECIPES: dict[str, dict] = {
    "uniform 8-bit": dict(q_bits=8),
    "uniform 6-bit": dict(q_bits=6),
    "uniform 4-bit": dict(q_bits=4),
    "mixed_6 4-bit": dict(q_bits=4, quant_recipe="mixed_6"),
    "mixed_8 4-bit": dict(q_bits=4, quant_recipe="mixed_8"),
    "uniform 3-bit": dict(q_bits=3),
    "mixed_6 3-bit": dict(q_bits=3, quant_recipe="mixed_6"),
    "uniform 2-bit": dict(q_bits=2),
    "mixed_6 2-bit": dict(q_bits=2, quant_recipe="mixed_6"),
    "mxfp4": dict(q_mode="mxfp4"),
    "nvfp4": dict(q_mode="nvfp4"),
    "mxfp8": dict(q_mode="mxfp8"),
}
EMBEDDING_SCALE = 0.05  # tied head: logits of std about EMBEDDING_SCALE * sqrt(hidden)


def scaled_init(name: str, shape: tuple[int, ...]) -> mx.array:
    """Norms near 1, embedding small, every matrix N(0, 1/fan_in): activations stay O(1)."""
    if "norm" in name:
        return 1 + 0.2 * mx.random.normal(shape)
    if "embed_tokens" in name or name.startswith("lm_head"):
        return EMBEDDING_SCALE * mx.random.normal(shape)
    return mx.random.normal(shape) / math.sqrt(shape[-1])


def float32_model(path: Path) -> nn.Module:
    """The converted model at `path`, computing in float32."""
    return load_model(path, dtype="float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=512, help="length of the token stream")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    mx.random.seed(args.seed)
    config = release_config(args.layers, args.experts, args.hidden, args.width, args.vocab)
    tokens = mx.random.randint(0, args.vocab, (4, args.tokens // 4))
    windows = [(row, 1) for row in tokens.tolist()]
    workdir = Path(tempfile.mkdtemp(prefix="quant_quality."))
    try:
        src = workdir / "src"
        write_checkpoint(src, config, 256 * 2**20, init=scaled_init)
        with redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            reference_summary = convert(src, workdir / "bf16", dtype="bfloat16")
        reference = Reference(float32_model(workdir / "bf16"), windows, len(windows))
        for label, kwargs in {"bf16 (reference)": None, **RECIPES}.items():
            dst = workdir / "quantized"
            if kwargs is None:
                summary, dst = reference_summary, workdir / "bf16"
            else:
                with redirect_stdout(sys.stderr):
                    summary = convert(src, dst, quantize=True, **kwargs)
            quantized = score(float32_model(dst), windows, len(windows), reference=reference)
            result = divergence(quantized, reference.scores)
            experts = summary.precision["routed experts"]
            share = sum(experts.values()) / summary.parameters
            record = {
                "recipe": label,
                "size_mb": round(summary.disk_bytes / 1e6, 2),
                "bits_per_weight": round(summary.bits_per_weight, 3),
                "top1_match": round(result.top1_agreement, 4),
                "mean_kl": float(f"{result.kl_mean:.3g}"),
                "routed_expert_share": round(share, 3),
            }
            print(json.dumps(record), flush=True)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
