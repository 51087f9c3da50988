"""Working memory of the gathered experts in inference: one graph against pieces evaluated in turn.

`FastPaths.gathered_piece_rows` runs a long inference call of the gathered experts in pieces of
whole tokens, each evaluated before the next is built. Two measurements, each line naming the
device (float32, the CPU's dtype; the model is built as `bench_generate` builds it, then cast):

- `call`: one layer's routed experts (4-bit, group 64, top-8) on `--tokens` random tokens, as one
  graph and in pieces of each `--piece-rows`: peak memory above the model and the inputs,
  seconds, and the largest difference from the one graph's output;
- `prefill`: the model's prefill of `--tokens` tokens in one chunk under the Metal policy, its
  gathered experts as one graph and in pieces: peak memory, weights and KV cache.

    python -m benchmarks.gathered_pieces --layers 2 --width-scale 0.25 --vocab 8192
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import mlx.core as mx

from benchmarks import a13b as bg
from hunyuan_mlx.cli import run_main
from hunyuan_mlx.interrupts import signals_as_interrupts
from hunyuan_mlx.models import FastPaths
from hunyuan_mlx.models.fast_paths import GATHERED_PIECE_ROWS, set_fast_paths

MB = 1e6


def peak_of(fn) -> tuple[float, float, float, mx.array]:
    """Memory active before (MB), the peak above it (MB), seconds, and the evaluated output."""
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    out = fn()
    mx.eval(out)
    return base / MB, (mx.get_peak_memory() - base) / MB, time.perf_counter() - tic, out


def measure_call(moe, hidden: int, args, head: dict, sink) -> None:
    """One layer's routed experts on `--tokens` random tokens: one graph, then each piece size."""
    experts, k, n = moe.experts, moe.top_k, moe.num_experts
    x = mx.random.normal((1, args.tokens, hidden))
    indices = mx.random.randint(0, n, (1, args.tokens, k)).astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((1, args.tokens, k)), axis=-1)
    mx.eval(x, indices, weights)
    expected = None
    for rows in [None, *args.piece_rows]:
        set_fast_paths(experts, FastPaths(gathered_piece_rows=rows))
        _, peak, seconds, out = peak_of(lambda: experts(x, indices, weights))
        expected = out if expected is None else expected
        diff = mx.abs(out - expected).max().item()
        record = {"kind": "call", **head, "piece_rows": rows, "peak_mb": peak, "s": seconds}
        bg.log({**record, "max_diff": diff}, sink)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bg.add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--piece-rows", type=bg.int_list, default=[GATHERED_PIECE_ROWS, 1024])
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    args = ap.parse_args()
    sink = open(args.out, "w") if args.out else None
    mx.random.seed(args.seed)
    model, cfg = bg.build_eval(args, mx.float32)
    weights_mb = mx.get_active_memory() / MB
    head = {"device": bg.device_name(), "dtype": "float32", "tokens": args.tokens}
    bg.log({"kind": "setup", **head, "argv": sys.argv[1:], "versions": bg.versions()}, sink)

    measure_call(model.layers[0].mlp, cfg["hidden_size"], args, head, sink)
    ids = mx.random.randint(0, cfg["vocab_size"], (1, args.tokens))
    metal = FastPaths.default(on="metal")
    for policy in (dataclasses.replace(metal, gathered_piece_rows=None), metal):
        set_fast_paths(model, policy)
        cache = model.make_cache()
        base, above, seconds, _ = peak_of(lambda c=cache: [model(ids, cache=c)[:, -1], c[0].state])
        kv = sum(a.nbytes for c in cache for a in c.state if isinstance(a, mx.array)) / MB
        bg.log(
            {
                "kind": "prefill",
                **head,
                "policy": "metal",
                "piece_rows": policy.gathered_piece_rows,
                "weights_mb": weights_mb,
                "kv_mb": kv,
                "peak_mb": base + above,
                "over_weights_and_kv_mb": base + above - weights_mb - kv,
                "s": seconds,
            },
            sink,
        )


if __name__ == "__main__":
    # Ctrl-C, SIGTERM and SIGHUP end it in one line, as this project's commands do.
    with run_main("gathered_pieces"), signals_as_interrupts():
        main()
