"""Is `GatheredGLU` right on this backend? Its paths against a float32 reference computed expert
by expert with plain matmuls, for unquantized and 4-bit experts, at test and A13B shapes.

`default` is the call under this backend's default `FastPaths` (with any MLX workaround),
`padded` the padded path forced; last, `raw_sorted` runs the plain path (`FastPaths.off()`) on
unquantized A13B-shaped experts: MLX's sorted `gather_mm`, which the CUDA workaround avoids.

    python -m benchmarks.check_gather_mm
"""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hunyuan_mlx.models import FastPaths
from hunyuan_mlx.models.experts import GatheredGLU
from hunyuan_mlx.models.fast_paths import set_fast_paths


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


def routed_experts(policy, glu, x, indices, weights):
    """`glu` on the routing, its kernel chosen by `policy`."""
    set_fast_paths(glu, policy)
    return glu(x, indices, weights)


def relerr(out, ref):
    o = out.reshape(ref.shape).astype(mx.float32)
    return (mx.linalg.norm((o - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()


def main():
    mx.random.seed(0)
    default = FastPaths.default()
    padded_always = dataclasses.replace(default, padded_min_rows=1, padded_float32=True)
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
                    out = routed_experts(default, glu, x, indices, weights)
                    padded = routed_experts(padded_always, glu, x, indices, weights)
                    set_fast_paths(glu, default)
                    rec["default_is_padded"] = glu.kernel(t * k, x.dtype) == "padded"
                    rec["default_relerr"], rec["padded_relerr"] = (
                        relerr(out, ref),
                        relerr(padded, ref),
                    )
                    print(json.dumps(rec), flush=True)
                    if d > 128 and not quant and dtype == mx.bfloat16 and t == 40:
                        last = (glu, x, indices, weights, ref, rec)
                if last is None or last[0] is not glu:
                    del glu
    glu, x, indices, weights, ref, rec = last
    raw = routed_experts(FastPaths.off(), glu, x, indices, weights)
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
