"""What `load_model`'s dtype costs on this machine: a QLoRA step and greedy decoding of a 4-bit
model with the release's 128,167-token vocabulary, loaded with bfloat16 scales and norms (the
checkpoint's, `dtype="checkpoint"`) and cast to float32 (`dtype="float32"`, what "auto" picks on
the CPU backend).

The model is a synthetic release-layout checkpoint (random weights, --layers layers of hidden
--hidden, 64 experts top-8) converted to 4-bit affine. A step is the loss and gradients of rank-8
LoRA on every layer's attention, shared MLP and experts over --tokens tokens (forward and
backward through the 4-bit tied head), taken with the trainer's own step; a prefill is the
forward of the same tokens. Both are timed with the routed experts gathered and padded (the
default policy takes the padded ones for bfloat16 rows only: `fast_paths.py`). One JSON line per
dtype, experts path and measurement:

    python -m benchmarks.cpu_dtype [--layers 2 --hidden 256 --tokens 400 --repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim

from benchmarks.synthetic import release_config, write_checkpoint
from hunyuan_mlx import load_model
from hunyuan_mlx.converter import convert
from hunyuan_mlx.models import FastPaths
from hunyuan_mlx.models.fast_paths import set_fast_paths
from hunyuan_mlx.tuner.adapters import prepare_model
from hunyuan_mlx.tuner.trainer import LoRAConfig, lora_parameters, training_step

VOCAB = 128167
DTYPES = ("checkpoint", "float32")


def expert_paths() -> dict[str, FastPaths]:
    """This backend's default policy with the routed experts always padded, or never."""
    default = FastPaths.default()
    return {
        "padded": dataclasses.replace(default, padded_min_rows=1, padded_float32=True),
        "gathered": dataclasses.replace(default, padded_min_rows=None),
    }


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `fn()` evaluated, after a warm-up call."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_step(path: Path, dtype: str, policy: FastPaths, tokens: mx.array, repeats: int) -> float:
    """Median seconds of one training step (LoRA loss, gradients and Adam update)."""
    model = load_model(path, dtype=dtype)
    set_fast_paths(model, policy)
    prepare_model(model, "lora", -1, lora_parameters(LoRAConfig()))
    model.train()
    step, state = training_step(model, optim.Adam(learning_rate=1e-5))
    lengths = mx.array([[0, tokens.shape[1]]])
    return median_seconds(lambda: (step(tokens, lengths, None, True)[0], state), repeats)


def time_prefill(
    path: Path, dtype: str, policy: FastPaths, tokens: mx.array, repeats: int
) -> float:
    """Median seconds of the forward of `tokens`."""
    model = load_model(path, dtype=dtype)
    set_fast_paths(model, policy)
    return median_seconds(lambda: model(tokens), repeats)


def decode_rate(path: Path, dtype: str, n_tokens: int) -> float:
    """Greedy decoding tokens per second after a 16-token prompt."""
    model = load_model(path, dtype=dtype)
    cache = model.make_cache()
    logits = model(mx.arange(16)[None], cache=cache)[:, -1]
    mx.eval(logits)
    start = time.perf_counter()
    for _ in range(n_tokens):
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1]
        mx.eval(logits)
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=400, help="tokens of a training step")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    mx.random.seed(0)
    config = release_config(args.layers, 64, args.hidden, args.hidden * 3 // 4, VOCAB)
    tokens = mx.random.randint(0, VOCAB, (1, args.tokens + 1))
    workdir = Path(tempfile.mkdtemp(prefix="cpu_dtype."))
    try:
        write_checkpoint(workdir / "src", config, 256 * 2**20)
        with redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            convert(workdir / "src", workdir / "q4", quantize=True, q_bits=4)
        for dtype in DTYPES:
            common = {"device": str(mx.default_device()), "dtype": dtype, "layers": args.layers,
                      "hidden": args.hidden, "vocab": VOCAB, "bits": 4}  # fmt: skip
            for experts, policy in expert_paths().items():
                for measure, timer in (("lora_step_s", time_step), ("prefill_s", time_prefill)):
                    seconds = timer(workdir / "q4", dtype, policy, tokens, args.repeats)
                    print(json.dumps({**common, "experts": experts, "measure": measure,
                                      "tokens": args.tokens, "value": round(seconds, 3)}),
                          flush=True)  # fmt: skip
            rate = decode_rate(workdir / "q4", dtype, args.decode_tokens)
            print(json.dumps({**common, "measure": "decode_tokens_per_s",
                              "value": round(rate, 2)}), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
