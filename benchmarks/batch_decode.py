"""Host cost of a batched decode step (the server's), and why batching cannot pay on a CPU.

- `step`: a model built as `bench_generate` builds it (float32), a batch of `--batches` sequences
  prefilled into mlx-lm's `BatchKVCache` (left-padded, as the server's batches are), then one
  decode step under the default policy (each layer's compiled step) and with `compiled_decode`
  off (the uncompiled step batches took before the compiled one accepted their array mask):
  graph nodes and the median time to build the step's graph (no evaluation);
- `rows`: a 4-bit `quantized_matmul` of `--rows` rows against one weight matrix, median time:
  on a CPU it grows in proportion to the rows, so a batch of B sequences costs B steps there;
- `decode` (with `--decode-steps N`): the batch's evaluated decode step, median time and tokens/s
  summed over the batch, under the default policy, with every expert on every token off
  (`every_expert_from`) and from each of `--every-expert-from`'s rows, in `--rounds` interleaved
  rounds.

The model is float32 on the CPU (its dtype), as built (bfloat16) elsewhere.

    python -m benchmarks.batch_decode --layers 32 --width-scale 0.0625 --experts 16 --vocab 4096
    python -m benchmarks.batch_decode --batches 1,2,4,8,16,32 --decode-steps 20 --rows ""  # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from benchmarks import a13b as bg
from benchmarks.profile_decode import primitives
from hunyuan_mlx.cli import run_main
from hunyuan_mlx.interrupts import signals_as_interrupts
from hunyuan_mlx.models import FastPaths
from hunyuan_mlx.models.fast_paths import using

BUILDS = 20  # steps built per measurement; the first few (tracing) are left out
TRACED = 5


def build_ms(model, step: mx.array, cache: list) -> tuple[float, int]:
    """Median milliseconds to build one decode step's graph, and its graph nodes."""
    times = []
    for _ in range(BUILDS):
        tic = time.perf_counter()
        out = model(step, cache=cache)
        times.append((time.perf_counter() - tic) * 1e3)
        mx.eval(out)
    return statistics.median(times[TRACED:]), sum(primitives(model(step, cache=cache)).values())


def prefilled(model, batch: int, prompt: int) -> tuple[list, mx.array]:
    """mlx-lm's `BatchKVCache`s of `batch` sequences of `prompt` tokens, left-padded as the
    server's batches are, and the prefill's last logits, evaluated."""
    cache = [BatchKVCache(left_padding=[3] * (batch - 1) + [0]) for _ in model.layers]
    logits = model(mx.ones((batch, prompt), mx.int32), cache=cache)[:, -1:]
    mx.eval(logits)
    return cache, logits


def decode_ms(model, batch: int, prompt: int, steps: int) -> float:
    """Median milliseconds of an evaluated greedy decode step of `batch` sequences after a
    left-padded prefill of `prompt` tokens (the first two steps left out: tracing)."""
    cache, logits = prefilled(model, batch, prompt)
    y = mx.argmax(logits, axis=-1)
    times = []
    for _ in range(steps + 2):
        tic = time.perf_counter()
        y = mx.argmax(model(y, cache=cache), axis=-1)
        mx.eval(y)
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times[2:])


def decode_rounds(model, args, head: dict, sink) -> None:
    """`decode_ms` for every batch under the default policy and without every-expert decode,
    interleaved over `--rounds` rounds after an untimed one."""
    default = FastPaths.default()
    policies = {"default": default}
    for rows in [None, *args.every_expert_from]:
        name = "no every expert" if rows is None else f"every expert from {rows} rows"
        policies[name] = dataclasses.replace(default, every_expert_from=rows)
    for rnd in range(args.rounds + 1):
        for b in args.batches:
            for name, policy in policies.items():
                with using(model, policy):
                    ms = decode_ms(model, b, args.prompt, args.decode_steps)
                record = {"kind": "decode", **head, "round": rnd, "warmup": rnd == 0, "batch": b}
                bg.log({**record, "policy": name, "every_expert_from": policy.every_expert_from,
                        "step_ms": ms, "tokens_per_s": b / ms * 1e3}, sink)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bg.add_model_args(ap)
    ap.add_argument("--batches", type=bg.int_list, default=[1, 8], help="sequences per batch")
    ap.add_argument("--prompt", type=int, default=40, help="prompt tokens per sequence")
    ap.add_argument(
        "--rows", type=bg.int_list, default=[1, 2, 4, 8, 16], help="rows of the quantized_matmul"
    )
    ap.add_argument("--decode-steps", type=int, default=0, help="timed decode steps (0: none)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds of the decode steps")
    ap.add_argument(
        "--every-expert-from", type=bg.int_list, default=[],
        help="also time the decode steps with every expert on every token from these routed rows",
    )
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    args = ap.parse_args()
    sink = open(args.out, "w") if args.out else None
    mx.random.seed(args.seed)
    dtype = mx.float32 if mx.default_device() == mx.cpu else None
    model, cfg = bg.build_eval(args, dtype)
    dtype_name = str(model.model.norm.weight.dtype).removeprefix("mlx.core.")
    head = {"device": bg.device_name(), "dtype": dtype_name, "layers": cfg["num_hidden_layers"]}
    bg.log({"kind": "setup", **head, "argv": sys.argv[1:], "versions": bg.versions()}, sink)

    default = FastPaths.default()
    for b in args.batches:
        for policy in (default, dataclasses.replace(default, compiled_decode=False)):
            with using(model, policy):
                cache, _ = prefilled(model, b, args.prompt)
                ms, nodes = build_ms(model, mx.ones((b, 1), mx.int32), cache)
            record = {"kind": "step", **head, "batch": b, "compiled": policy.compiled_decode}
            bg.log({**record, "build_ms": ms, "nodes": nodes}, sink)

    if args.decode_steps:
        decode_rounds(model, args, head, sink)

    weight = mx.random.normal((cfg["vocab_size"], cfg["hidden_size"]))
    packed = mx.quantize(weight, args.group_size, args.bits)
    for rows in args.rows:
        x = mx.random.normal((rows, cfg["hidden_size"]))

        def product(x: mx.array = x) -> mx.array:
            return mx.quantized_matmul(x, *packed, True, args.group_size, args.bits)

        mx.eval(product())
        shape = list(weight.shape)
        record = {"kind": "rows", **head, "rows": rows, "weight": shape, "bits": args.bits}
        bg.log({**record, "ms": bg.median_ms(product, 50)}, sink)


if __name__ == "__main__":
    # Ctrl-C, SIGTERM and SIGHUP end it in one line, as this project's commands do.
    with run_main("batch_decode"), signals_as_interrupts():
        main()
