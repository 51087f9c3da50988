"""Is `GatheredGLU` right on this backend? Its paths against a float32 reference computed expert
by expert with plain matmuls, for unquantized and 4-bit experts, at test and A13B shapes.

`plain` is the call with fast paths off, `padded` the padded path forced; last, `raw_sorted`
forces MLX's sorted `gather_mm` on unquantized A13B-shaped experts (what `GatheredLinear` would
run without the CUDA workaround in `GatheredGLU.sorted_gather_mm_unsafe`).

    python benchmarks/check_gather_mm.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hunyuan_mlx import moe  # noqa: E402
from hunyuan_mlx.moe import GatheredGLU  # noqa: E402


def dense(p):
    if "scales" in p:
        w = mx.dequantize(p.weight, p.scales, p.get("biases"), group_size=p.group_size, bits=p.bits)
    else:
        w = p.weight
    return w.astype(mx.float32)


def reference(glu, x, indices, weights):
    """(tokens, D) float32, one expert at a time."""
    inter = glu.intermediate_size
    w_gu, w_dn = dense(glu.gate_up_proj), dense(glu.down_proj)
    xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    idx = np.array(indices.reshape(xf.shape[0], -1))
    out = mx.zeros((*idx.shape, xf.shape[-1]), dtype=mx.float32)
    for e in np.unique(idx):
        t, j = np.nonzero(idx == e)
        h = xf[mx.array(t)] @ w_gu[int(e)].T
        h = nn.silu(h[:, :inter]) * h[:, inter:]
        out[mx.array(t), mx.array(j)] = h @ w_dn[int(e)].T
        mx.eval(out)
    return (out * weights.reshape(*idx.shape, 1)).sum(axis=1)


def relerr(out, ref):
    o = out.reshape(ref.shape).astype(mx.float32)
    return (mx.linalg.norm((o - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()


def main():
    mx.random.seed(0)
    shapes = [(64, 32, 8, 2, [3, 40]), (4096, 3072, 64, 8, [1, 8, 40, 100])]
    last = None
    for d, inter, e, k, token_counts in shapes:
        for quant in (False, True):
            for dtype in (mx.float32, mx.bfloat16):
                glu = GatheredGLU(d, inter, e)
                if quant:
                    nn.quantize(glu, 32 if d < 128 else 64, 4)
                glu.set_dtype(dtype)
                glu.eval()
                mx.eval(glu.parameters())
                for t in token_counts:
                    x = mx.random.normal((1, t, d)).astype(dtype)
                    indices = mx.argsort(mx.random.uniform(shape=(1, t, e)), axis=-1)[..., :k]
                    weights = mx.softmax(mx.random.normal((1, t, k)), axis=-1)
                    ref = reference(glu, x, indices, weights)
                    rec = {
                        "D": d,
                        "E": e,
                        "k": k,
                        "tokens": t,
                        "quantized": quant,
                        "dtype": str(dtype),
                        "rows": t * k,
                    }
                    with moe.fast_paths(False):
                        plain = glu(x, indices, weights)
                    old = dict(moe.PADDED_MIN_ROWS)
                    moe.PADDED_MIN_ROWS[moe.backend()] = 1
                    padded = glu(x, indices, weights)
                    moe.PADDED_MIN_ROWS.update(old)
                    rec["plain_is_padded"] = bool(
                        t * k >= moe.SORT_THRESHOLD and glu.sorted_gather_mm_unsafe()
                    )
                    rec["plain_relerr"], rec["padded_relerr"] = (
                        relerr(plain, ref),
                        relerr(padded, ref),
                    )
                    print(json.dumps(rec), flush=True)
                    if d > 128 and not quant and dtype == mx.bfloat16 and t == 40:
                        last = (glu, x, indices, weights, ref, rec)
                if last is None or last[0] is not glu:
                    del glu
    glu, x, indices, weights, ref, rec = last
    glu.sorted_gather_mm_unsafe = lambda: False  # MLX's sorted gather_mm, as the plain path had
    with moe.fast_paths(False):
        raw = glu(x, indices, weights)
    o = raw.reshape(ref.shape).astype(mx.float32)
    print(
        json.dumps(
            {
                **rec,
                "raw_sorted_gather_mm_relerr": relerr(raw, ref),
                "raw_nan": bool(mx.isnan(o).any().item()),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
