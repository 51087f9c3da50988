# ruff: noqa: B023, E702, E741, F821
"""Per-kernel profile of one A13B layer at prefill-chunk and decode shapes, with candidate paths.

Times (median of `--reps`, after a warm-up, synchronised) each piece of one decoder layer at
T tokens, and the candidate ways to run the routed experts, checking each candidate against the
sorted `gather_qmm` result (relative error, NaN). Prints one JSON line per measurement.

    python -m benchmarks.profile_moe --tokens 1,512,2048
"""

from __future__ import annotations

import argparse
import json
import math
import time

import mlx.core as mx
import mlx.nn as nn

from benchmarks.a13b import median_ms, random_words

D, I, E, K, H, KV, HD, V = 4096, 3072, 64, 8, 32, 8, 128, 128167


def qrand(shape_out_in, bits=4, gs=64, dtype=mx.bfloat16):
    *lead, out, inp = shape_out_in
    w = random_words((*lead, out, inp * bits // 32))
    a = 1 / math.sqrt(inp)
    s = (2 * a / 15) * mx.random.uniform(0.75, 1.25, (*lead, out, inp // gs))
    b = -s * 7.5
    return w, s.astype(dtype), b.astype(dtype)


def bench(fn, reps):
    try:
        out = fn()
        mx.eval(out)
    except Exception as e:  # a candidate this backend lacks
        print(json.dumps({"kind": "error", "error": str(e)[:200]}), flush=True)
        return float("nan"), None
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return median_ms(fn, reps), out


def relerr(a, b):
    if a is None:
        return None
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def log(**kw):
    print(json.dumps(kw), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,512,2048")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    args = ap.parse_args()
    global D, I, H, KV, V
    if args.small:
        D, I, H, KV, V = 256, 128, 2, 1, 1000
    mx.random.seed(0)
    gu = qrand((E, 2 * I, D))
    dn = qrand((E, D, I))
    qp, kp, vp, op = (
        qrand((H * HD, D)),
        qrand((KV * HD, D)),
        qrand((KV * HD, D)),
        qrand((D, H * HD)),
    )
    sg, su, sd = qrand((I, D)), qrand((I, D)), qrand((D, I))
    head = qrand((V, D))
    router = mx.random.normal((E, D)) / math.sqrt(D)
    mx.eval(gu, dn, qp, kp, vp, op, sg, su, sd, head, router)
    log(
        kind="info",
        device=str(mx.default_device()),
        info=str(mx.device_info()),
        active_gb=mx.get_active_memory() / 1e9,
    )

    def qmm(x, w):
        return mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=4)

    def gqmm(x, w, idx, srt):
        return mx.gather_qmm(
            x, *w, rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=srt
        )

    for T in [int(t) for t in args.tokens.split(",")]:
        reps = args.reps if T > 1 else 50
        x = mx.random.normal((1, T, D)).astype(mx.bfloat16)
        logits = x.astype(mx.float32) @ router.T
        idx = mx.argpartition(-logits, kth=K - 1, axis=-1)[..., :K].astype(mx.uint32)
        mx.eval(x, idx)
        flat = idx.flatten()
        order = mx.argsort(flat)
        xs = x.reshape(-1, 1, D)[order // K]
        ids = flat[order]
        mx.eval(xs, ids)
        sort_flag = T * K >= 64
        xg = xs if sort_flag else mx.expand_dims(x, (-2, -3))
        ig = ids if sort_flag else idx
        rows = T * K
        flop_gu = 2 * rows * 2 * I * D

        def p(name, ms, **kw):
            log(kind="time", T=T, op=name, ms=ms, **kw)

        # Attention pieces
        ms, _ = bench(lambda: qmm(x, qp), reps)
        p("q_proj", ms)
        ms, _ = bench(lambda: qmm(x, kp), reps)
        p("k_proj", ms)
        qkv = (
            mx.concatenate([qp[0], kp[0], vp[0]]),
            mx.concatenate([qp[1], kp[1], vp[1]]),
            mx.concatenate([qp[2], kp[2], vp[2]]),
        )
        mx.eval(qkv)
        ms, _ = bench(lambda: qmm(x, qkv), reps)
        p("qkv_fused", ms)
        ms, _ = bench(lambda: qmm(x, op), reps)
        p("o_proj", ms)
        q = mx.random.normal((1, H, T, HD)).astype(mx.bfloat16)
        k = mx.random.normal((1, KV, T, HD)).astype(mx.bfloat16)
        mx.eval(q, k)
        ms, _ = bench(
            lambda: mx.fast.scaled_dot_product_attention(
                q, k, k, scale=HD**-0.5, mask="causal" if T > 1 else None
            ),
            reps,
        )
        p("sdpa_self", ms)
        ms, _ = bench(
            lambda: mx.fast.rope(q, HD, traditional=False, base=1e4, scale=1.0, offset=0), reps
        )
        p("rope_q", ms)
        wn = mx.ones((D,), dtype=mx.bfloat16)
        ms, _ = bench(lambda: mx.fast.rms_norm(x, wn, 1e-5), reps)
        p("rms_norm", ms)
        # Router
        ms, _ = bench(
            lambda: mx.softmax(x.astype(mx.float32) @ router.T, axis=-1, precise=True), reps
        )
        p("router_softmax", ms)
        ms, _ = bench(lambda: mx.argpartition(-logits, kth=K - 1, axis=-1)[..., :K], reps)
        p("argpartition", ms)
        ms, _ = bench(lambda: mx.argsort(mx.argsort(flat)), reps)
        p("two_argsorts", ms)
        # Shared MLP
        ms, _ = bench(lambda: qmm(nn.silu(qmm(x, sg)) * qmm(x, su), sd), reps)
        p("shared_mlp", ms)
        # Routed experts: baseline
        ms_gate_up, ref = bench(lambda: gqmm(xg, gu, ig, sort_flag), reps)
        p("gather_qmm_gate_up", ms_gate_up, tflops=flop_gu / ms_gate_up / 1e9, sorted=sort_flag)
        hid = nn.silu(ref[..., :I]) * ref[..., I:]
        mx.eval(hid)
        ms, ref_dn = bench(lambda: gqmm(hid, dn, ig, sort_flag), reps)
        p("gather_qmm_down", ms, tflops=flop_gu / 2 / ms / 1e9)
        if 1 < T <= 64:  # a batched decode step's T sequences: every expert on every row
            p("gather_qmm_per_token", (ms_gate_up + ms) / T)
            all_rows = mx.arange(E, dtype=mx.uint32)
            x_rows = x.reshape(T, D)
            ms, _ = bench(lambda: qmm(x_rows, tuple(a.reshape(E * 2 * I, -1) for a in gu)), reps)
            p("all_experts_qmm_gate_up", ms, tflops=2 * T * E * 2 * I * D / ms / 1e9)
            ms, _ = bench(
                lambda: mx.gather_qmm(
                    x_rows, *gu, lhs_indices=mx.zeros((E,), mx.uint32), rhs_indices=all_rows,
                    transpose=True, group_size=64, bits=4,
                ),
                reps,
            )
            p("all_experts_gather_qmm_gate_up", ms, tflops=2 * T * E * 2 * I * D / ms / 1e9)
            h_all = mx.random.normal((E, T, I)).astype(mx.bfloat16)
            mx.eval(h_all)
            ms, _ = bench(
                lambda: mx.gather_qmm(
                    h_all, *dn, lhs_indices=all_rows, rhs_indices=all_rows,
                    transpose=True, group_size=64, bits=4,
                ),
                reps,
            )
            p("all_experts_gather_qmm_down", ms, tflops=2 * T * E * I * D / ms / 1e9)
            if rows < E:  # as many experts as routed rows: the call's experts on every row
                some = all_rows[:rows]
                ms, _ = bench(
                    lambda: mx.gather_qmm(
                        x_rows, *gu, lhs_indices=mx.zeros((rows,), mx.uint32), rhs_indices=some,
                        transpose=True, group_size=64, bits=4,
                    ),
                    reps,
                )
                p("call_experts_gather_qmm_gate_up", ms, experts=rows)
                ms, _ = bench(
                    lambda: mx.gather_qmm(
                        h_all[:rows], *dn, lhs_indices=some, rhs_indices=some,
                        transpose=True, group_size=64, bits=4,
                    ),
                    reps,
                )
                p("call_experts_gather_qmm_down", ms, experts=rows)
            continue
        if T == 1:
            ms, _ = bench(lambda: qmm(x, head), reps)
            p("head", ms)
            # 9 experts (8 + shared stacked) in one gather
            gu9 = tuple(
                mx.concatenate([a, b[None]])
                for a, b in zip(
                    gu,
                    (
                        mx.concatenate([sg[0], su[0]]),
                        mx.concatenate([sg[1], su[1]]),
                        mx.concatenate([sg[2], su[2]]),
                    ),
                )
            )
            mx.eval(gu9)
            idx9 = mx.concatenate([idx, mx.full((1, 1, 1), E, dtype=mx.uint32)], axis=-1)
            ms, _ = bench(lambda: gqmm(mx.expand_dims(x, (-2, -3)), gu9, idx9, False), reps)
            p("gather_qmm_gate_up_9", ms)
            del gu9
            continue

        # Candidate: dequantize the layer, then gather_mm sorted
        def deq(w):
            return mx.dequantize(*w, group_size=64, bits=4)

        ms, wgu = bench(lambda: deq(gu), reps)
        p("dequant_gate_up", ms, gb=wgu.nbytes / 1e9)
        ms, out = bench(
            lambda: mx.gather_mm(xs, wgu.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True),
            reps,
        )
        p(
            "gather_mm_swapaxes",
            ms,
            tflops=flop_gu / ms / 1e9,
            relerr=relerr(out, ref),
            nan=None if out is None else bool(mx.isnan(out).any().item()),
        )
        wgu_t = mx.contiguous(wgu.swapaxes(-1, -2))
        mx.eval(wgu_t)
        ms, out = bench(lambda: mx.gather_mm(xs, wgu_t, rhs_indices=ids, sorted_indices=True), reps)
        p(
            "gather_mm_contig_T",
            ms,
            tflops=flop_gu / ms / 1e9,
            relerr=relerr(out, ref),
            nan=None if out is None else bool(mx.isnan(out).any().item()),
        )
        del wgu_t
        # Candidate: host counts, per-expert matmul on sorted contiguous row blocks
        counts = mx.zeros((E,), mx.int32).at[ids].add(1)
        t = time.perf_counter()
        cnt = counts.tolist()
        sync_ms = (time.perf_counter() - t) * 1e3
        p("counts_sync", sync_ms, max_count=max(cnt), min_count=min(cnt))
        starts = [0]
        for c in cnt:
            starts.append(starts[-1] + c)
        x2 = xs.reshape(-1, D)

        def per_expert_mm():
            outs = [x2[starts[e] : starts[e + 1]] @ wgu[e].T for e in range(E) if cnt[e]]
            return mx.concatenate(outs)

        ms, out = bench(per_expert_mm, reps)
        p(
            "per_expert_matmul",
            ms,
            tflops=flop_gu / ms / 1e9,
            relerr=relerr(out, ref.reshape(-1, 2 * I)),
        )

        def per_expert_qmm():
            outs = [
                qmm(x2[starts[e] : starts[e + 1]], (gu[0][e], gu[1][e], gu[2][e]))
                for e in range(E)
                if cnt[e]
            ]
            return mx.concatenate(outs)

        ms, out = bench(per_expert_qmm, reps)
        p(
            "per_expert_qmm",
            ms,
            tflops=flop_gu / ms / 1e9,
            relerr=relerr(out, ref.reshape(-1, 2 * I)),
        )
        # Padded batched matmul: (E, C, D) @ (E, D, 2I)
        C = max(cnt)
        pos = mx.arange(rows) - mx.array(starts[:-1])[ids]
        slot = ids.astype(mx.int32) * C + pos

        def padded():
            buf = mx.zeros((E * C, D), dtype=x.dtype).at[slot].add(x2)  # scatter rows
            y = mx.matmul(buf.reshape(E, C, D), wgu.swapaxes(-1, -2))
            return y.reshape(E * C, -1)[slot]

        ms, out = bench(padded, reps)
        p(
            "padded_bmm",
            ms,
            tflops=flop_gu / ms / 1e9,
            capacity=C,
            relerr=relerr(out, ref.reshape(-1, 2 * I)),
        )
        # Dense matmul roofline at the same flops: all rows against one expert
        w0 = wgu[0]
        ms, _ = bench(lambda: x2 @ w0.T, reps)
        p("dense_mm_same_rows", ms, tflops=flop_gu / ms / 1e9)
        ms, _ = bench(lambda: qmm(x2, (gu[0][0], gu[1][0], gu[2][0])), reps)
        p("dense_qmm_same_rows", ms, tflops=flop_gu / ms / 1e9)
        del wgu, out
        mx.clear_cache()
        log(kind="mem", T=T, peak_gb=mx.get_peak_memory() / 1e9)


if __name__ == "__main__":
    main()
