"""What `load_model`'s dtype costs on this machine: a QLoRA step and greedy decoding of a 4-bit
model with the release's 128,167-token vocabulary, loaded with bfloat16 scales and norms (the
checkpoint's, `dtype="checkpoint"`) and cast to float32 (`dtype="float32"`, what "auto" picks on
the CPU backend).

The model is a synthetic release-layout checkpoint (random weights, --layers layers of hidden
--hidden, 64 experts top-8) converted to 4-bit affine. A step is the loss and gradients of rank-8
LoRA on every layer's attention, shared MLP and experts over --tokens tokens (forward and
backward through the 4-bit tied head). One JSON line per dtype and measurement:

    python -m benchmarks.cpu_dtype [--layers 2 --hidden 256 --tokens 400 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from benchmarks.synthetic import release_config, write_checkpoint
from hunyuan_mlx import load_model
from hunyuan_mlx.converter import convert
from hunyuan_mlx.tuner.adapters import prepare_model
from hunyuan_mlx.tuner.trainer import LoRAConfig, lora_parameters, masked_loss

VOCAB = 128167
DTYPES = ("checkpoint", "float32")


def time_step(path: Path, dtype: str, tokens: mx.array, repeats: int) -> float:
    """Median seconds of one LoRA loss-and-gradients step, after a warm-up step."""
    model = load_model(path, dtype=dtype)
    prepare_model(model, "lora", -1, lora_parameters(LoRAConfig()))
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    lengths = mx.array([[0, tokens.shape[1]]])
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        mx.eval(loss_and_grad(model, tokens, lengths))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


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
            step = time_step(workdir / "q4", dtype, tokens, args.repeats)
            print(json.dumps({**common, "measure": "lora_step_s", "tokens": args.tokens,
                              "value": round(step, 3)}), flush=True)  # fmt: skip
            rate = decode_rate(workdir / "q4", dtype, args.decode_tokens)
            print(json.dumps({**common, "measure": "decode_tokens_per_s",
                              "value": round(rate, 2)}), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
