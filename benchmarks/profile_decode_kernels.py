"""Decode-step kernels of one A13B layer, 32 in a row (as 32 layers would run them), per call.

Each variant issues `--depth` calls on distinct weight sets and random expert choices, evaluated
together, and reports the time per call (median of `--reps`). Checks the sorted variant's output
against the unsorted one, and each split variant's against one call.

Split variants run a token's top-8 experts as several `gather_qmm` calls of fewer rows
(`split4`: 4 + 4, `split7`: 7 + 1, `split1`: 8 x 1); `head_*` is the tied 128167 x 4096 head at one
token, as one `quantized_matmul` or as chunks of at most 16384 rows concatenated.

    python -m benchmarks.profile_decode_kernels
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import mlx.core as mx

from benchmarks.a13b import random_words

D, INTER, E, K, VOCAB = 4096, 3072, 64, 8, 128167
SPLITS = {"split4": [4, 4], "split7": [7, 1], "split1": [1] * 8}


def qrand(shape, bits=4, gs=64):
    *lead, out, inp = shape
    w = random_words((*lead, out, inp * bits // 32))
    a = 1 / math.sqrt(inp)
    s = (2 * a / 15) * mx.random.uniform(0.75, 1.25, (*lead, out, inp // gs))
    return w, s.astype(mx.bfloat16), (-s * 7.5).astype(mx.bfloat16)


def timed(make, reps):
    mx.eval(make())
    ts = []
    for _ in range(reps):
        outs = make()
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--sets", type=int, default=4, help="distinct weight sets, cycled")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    mx.random.seed(0)
    n = args.depth
    gu = [qrand((E, 2 * INTER, D)) for _ in range(args.sets)]
    gu9 = [qrand((E + 1, 2 * INTER, D)) for _ in range(args.sets)]
    dn = [qrand((E, D, INTER)) for _ in range(args.sets)]
    sq = [qrand((D, D)) for _ in range(args.sets)]
    wide = [qrand((2 * INTER, D)) for _ in range(args.sets)]
    half = [qrand((INTER, D)) for _ in range(args.sets)]
    head = qrand((VOCAB, D))
    mx.eval(gu, gu9, dn, sq, wide, half, head)
    x = mx.random.normal((1, 1, D)).astype(mx.bfloat16)
    xh = mx.random.normal((1, 1, INTER)).astype(mx.bfloat16)
    mx.eval(x, xh)

    def idx(i, e=E):
        return mx.argsort(mx.random.uniform(shape=(1, 1, e), key=mx.random.key(i)))[..., :K]

    idxs = [idx(i).astype(mx.uint32) for i in range(n)]
    sorted_idxs = [mx.sort(i.flatten()) for i in idxs]
    mx.eval(idxs, sorted_idxs)

    def gq(xx, w, ii, srt=False):
        return mx.gather_qmm(
            xx, *w, rhs_indices=ii, transpose=True, group_size=64, bits=4, sorted_indices=srt
        )

    def qm(xx, w):
        return mx.quantized_matmul(xx, *w, transpose=True, group_size=64, bits=4)

    def split_gq(xx, w, ii, sizes):
        """One token's top-8 as several calls of `sizes` choices, concatenated (..., 8, 1, N)."""
        bounds = [sum(sizes[:j]) for j in range(1, len(sizes))]
        parts = mx.split(ii, bounds, axis=-1) if bounds else [ii]
        xs = mx.split(xx, bounds, axis=-3) if bounds and xx.shape[-3] > 1 else [xx] * len(parts)
        return mx.concatenate([gq(a, w, b) for a, b in zip(xs, parts)], axis=-3)

    def split_chain(xx, ws, sizes):
        return lambda: [split_gq(xx, ws[i % args.sets], idxs[i], sizes) for i in range(n)]

    def head_chunks(xx, rows):
        w, sc, b = head
        return mx.concatenate(
            [
                qm(xx, (w[a : a + rows], sc[a : a + rows], b[a : a + rows]))
                for a in range(0, VOCAB, rows)
            ],
            axis=-1,
        )

    xe = mx.expand_dims(x, (-2, -3))  # (1, 1, 1, 1, D)
    xr = mx.broadcast_to(x.reshape(1, 1, D), (K, 1, D))  # 8 rows, one per choice
    xhe = mx.broadcast_to(xh.reshape(1, 1, 1, 1, INTER), (1, 1, K, 1, INTER))
    xhr = mx.broadcast_to(xh.reshape(1, 1, INTER), (K, 1, INTER))
    s = args.sets
    variants = {
        "gate_up_top8_unsorted": lambda: [gq(xe, gu[i % s], idxs[i]) for i in range(n)],
        "gate_up_top8_sorted": lambda: [gq(xr, gu[i % s], sorted_idxs[i], True) for i in range(n)],
        "gate_up_top8_rows_unsorted": lambda: [gq(xr, gu[i % s], sorted_idxs[i]) for i in range(n)],
        "gate_up_top9_unsorted": lambda: [
            gq(xe, gu9[i % s], mx.concatenate([idxs[i], mx.full((1, 1, 1), E, mx.uint32)], -1))
            for i in range(n)
        ],
        "down_top8_unsorted": lambda: [gq(xhe, dn[i % s], idxs[i]) for i in range(n)],
        "down_top8_sorted": lambda: [gq(xhr, dn[i % s], sorted_idxs[i], True) for i in range(n)],
        **{f"gate_up_top8_{k}": split_chain(xe, gu, v) for k, v in SPLITS.items()},
        **{f"down_top8_{k}": split_chain(xhe, dn, v) for k, v in SPLITS.items()},
        "head_one_call": lambda: [qm(x, head) for _ in range(n // 8)],
        "head_chunks_16384": lambda: [head_chunks(x, 16384) for _ in range(n // 8)],
        "head_chunks_8192": lambda: [head_chunks(x, 8192) for _ in range(n // 8)],
        "qmv_4096x4096": lambda: [qm(x, sq[i % s]) for i in range(n)],
        "qmv_6144x4096": lambda: [qm(x, wide[i % s]) for i in range(n)],
        "qmv_3072x4096": lambda: [qm(x, half[i % s]) for i in range(n)],
    }
    for name, make in variants.items():
        t = timed(make, args.reps)
        print(json.dumps({"kind": "chain", "op": name, "us_per_call": t / n * 1e6}), flush=True)
    a = gq(xe, gu[0], idxs[0]).reshape(K, -1)
    order = mx.argsort(idxs[0].flatten())
    b = gq(xr, gu[0], sorted_idxs[0], True).reshape(K, -1)
    err = (mx.abs(a[order].astype(mx.float32) - b.astype(mx.float32)).max()).item()
    print(json.dumps({"kind": "check", "sorted_vs_unsorted_max_abs": err}))
    for name, sz in SPLITS.items():
        for label, xx, w in (("gate_up", xe, gu[0]), ("down", xhe, dn[0])):
            one = gq(xx, w, idxs[0]).astype(mx.float32)
            split = split_gq(xx, w, idxs[0], sz).astype(mx.float32)
            rel = (mx.abs(one - split).max() / mx.abs(one).max()).item()
            print(json.dumps({"kind": "check", "op": f"{label}_{name}", "rel_max_diff": rel}))
    one = qm(x, head).astype(mx.float32)
    rel = (mx.abs(one - head_chunks(x, 16384).astype(mx.float32)).max() / mx.abs(one).max()).item()
    print(json.dumps({"kind": "check", "op": "head_chunks_16384", "rel_max_diff": rel}))


if __name__ == "__main__":
    main()
