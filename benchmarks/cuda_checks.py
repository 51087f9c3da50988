"""Two CUDA workarounds checked where they matter, in a few seconds of a GPU.

- `quantized_attention`: mlx-lm's attention over an 8-bit quantized KV cache for 510 queries at
  A13B's heads, as it is (MLX 0.32.4's CUDA `quantized_matmul` lacked a kernel for it) and through
  `FastPaths.dequantize_kv_for_queries`, each against the fused kernel on the dequantized cache;
- `single_token_attention_32_layers`: a lone sequence's single-token attention, 32 layers' worth,
  with no mask (what `hunyuan.attention_mask` now passes it) and with the all-true array mask it
  passed before, at 575 and 4,096 keys.

    python -m benchmarks.cuda_checks
"""

import statistics
import time

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import QuantizedKVCache

from benchmarks.a13b import device_name, versions
from benchmarks.a13b import log as log_record
from hunyuan_mlx.models import FastPaths
from hunyuan_mlx.models.fast_paths import attention


def log(**record) -> None:
    log_record(record, None)


def main() -> None:
    log(kind="setup", device=device_name(), versions=versions())
    mx.random.seed(0)
    B, H, KV, D, L = 1, 32, 8, 128, 510
    q = mx.random.normal((B, H, L, D)).astype(mx.bfloat16)
    k = mx.random.normal((B, KV, L, D)).astype(mx.bfloat16)
    v = mx.random.normal((B, KV, L, D)).astype(mx.bfloat16)
    cache = QuantizedKVCache(group_size=64, bits=8)
    qk, qv = cache.update_and_fetch(k, v)
    mask = create_causal_mask(L, 0)
    ref = mx.fast.scaled_dot_product_attention(
        q, *(mx.dequantize(*t, group_size=64, bits=8) for t in (qk, qv)), scale=D**-0.5, mask=mask
    )
    mx.eval(ref)
    for name, policy in (
        ("quantized (no workaround)", FastPaths()),
        ("dequantized (workaround)", FastPaths(dequantize_kv_for_queries=True)),
    ):
        try:
            # A copy: mlx-lm's quantized attention scales its queries in place (`queries *= scale`).
            out = attention(q * 1, qk, qv, cache, D**-0.5, mask, policy)
            err = (mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max()).item()
            log(kind="quantized_attention", path=name, ok=True, max_abs_diff=err)
        except Exception as e:  # the missing kernel
            log(kind="quantized_attention", path=name, ok=False, error=str(e)[:200])
    log(kind="policy", dequantize_kv_for_queries=FastPaths.default().dequantize_kv_for_queries)

    # A lone sequence's single-token step: no mask against an all-true array mask, 32 layers' worth.
    for S in (575, 4096):
        q1 = mx.random.normal((1, H, 1, D)).astype(mx.bfloat16)
        k1 = mx.random.normal((1, KV, S, D)).astype(mx.bfloat16)
        v1 = mx.random.normal((1, KV, S, D)).astype(mx.bfloat16)
        ones = mx.ones((1, 1, 1, S), dtype=mx.bool_)
        mx.eval(q1, k1, v1, ones)
        times = {"none": [], "array": []}
        for rep in range(7):
            for name, m in (("none", None), ("array", ones)):
                mx.synchronize()
                tic = time.perf_counter()
                outs = [
                    mx.fast.scaled_dot_product_attention(q1, k1, v1, scale=D**-0.5, mask=m)
                    for _ in range(32)
                ]
                mx.eval(outs)
                if rep:
                    times[name].append((time.perf_counter() - tic) * 1e3)
        med = {n: statistics.median(t) for n, t in times.items()}
        log(
            kind="single_token_attention_32_layers",
            keys=S,
            ms_no_mask=med["none"],
            ms_array_mask=med["array"],
        )


if __name__ == "__main__":
    main()
