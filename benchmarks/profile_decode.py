"""Decode-step variants at full A13B shape: where a token's time goes, and what fusing saves.

Builds the model as `bench_generate` does, prefills one prompt per variant, then times greedy
decode (pipelined as mlx-lm's generate_step) for each variant, interleaved over rounds, and the host
time to build one step's graph (no evaluation). Variants patch this project's model at runtime, so
that they can be measured before any layout change is made for real:

- mlxlm: mlx-lm's model on the same weights;
- plain: this project with its fast paths off;
- layer: this project with each layer's compiled decode step (`compiled_decode`), not the whole
  model's;
- graph: this project with the whole model's step as one compiled graph (`decode_graph`);
- default: this project as it is;
- layer+qkv: q/k/v projections fused into one quantized matmul (concatenated copies, measurement
  only);
- layer+qkv+shared: and the shared expert's gate/up fused likewise.

Each line names the device and the variant's policy.

    python -m benchmarks.profile_decode --prompt 512 --gen 64 --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from benchmarks import a13b as bg
from hunyuan_mlx.models import fast_paths as fp
from hunyuan_mlx.models.hunyuan import HunYuanMoEV1MLP


def fuse(linears: list[nn.Module]) -> nn.QuantizedLinear:
    """One quantized linear whose output is the given ones' outputs concatenated."""
    first = linears[0]
    out = nn.QuantizedLinear(first.group_size, 8, False, first.group_size, first.bits)
    out.weight = mx.concatenate([m.weight for m in linears])
    out.scales = mx.concatenate([m.scales for m in linears])
    out.biases = mx.concatenate([m.biases for m in linears])
    mx.eval(out.parameters())
    return out


def fused_pre(self, x, offset):
    attn = self.self_attn
    h = self.input_layernorm(x)
    nq = attn.num_heads * attn.head_dim
    nk = attn.num_key_value_heads * attn.head_dim
    q, k, v = mx.split(self.qkv_fused(h), [nq, nq + nk], axis=-1)
    return *attn.heads(q, (k, v), offset), (k, v)


def fused_shared_call(self, x):
    inter = self.down_proj.weight.shape[-1] * 32 // self.down_proj.bits
    gate, up = mx.split(self.gate_up_fused(x), [inter], axis=-1)
    return self.down_proj(nn.silu(gate) * up)


def decode(model, prompt, n_gen, prefill_step):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    p = bg.prefill(model, prompt, cache, prefill_step)

    def step(tok):
        logits = model(tok[None], cache=cache)[:, -1, :]
        return mx.argmax(logits, axis=-1)

    y = step(p)
    mx.eval(y)
    toks = []
    host = [0.0, 0.0, 0.0]  # building the graph, async_eval (encoding kernels), waiting
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(n_gen):
        t0 = time.perf_counter()
        nxt = step(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        toks.append(y.item())
        t3 = time.perf_counter()
        y = nxt
        for j, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            host[j] += d * 1e3 / n_gen
    dt = time.perf_counter() - t
    # Steps on an idle GPU: building the graph, encoding its kernels (async_eval), then what the
    # GPU still has to run (medians of 8).
    idle = []
    for _ in range(8):
        mx.synchronize()
        t0 = time.perf_counter()
        nxt = step(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        mx.eval(nxt)
        idle.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3))
        y = nxt
    idle_ms = [statistics.median(v[j] for v in idle) for j in range(3)]
    return n_gen / dt, idle_ms, host, toks, primitives(step(y))


def primitives(out: mx.array) -> dict[str, int]:
    """Primitives in one decode step's graph, by name (what the backend encodes per token)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.dot"
        mx.export_to_dot(str(path), out)
        names = re.findall(r'label ="([A-Za-z_]+)"', path.read_text())
    return dict(collections.Counter(names).most_common())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="mlxlm,plain,layer,graph,default")
    ap.add_argument("--out", default=None)
    bg.add_model_args(ap)
    args = ap.parse_args()
    sink = open(args.out, "w") if args.out else None
    device = bg.device_name()
    mx.random.seed(args.seed)
    cfg = bg.release_config(args)
    args._layers = cfg["num_hidden_layers"]
    ours = bg.build_ours(cfg, args)
    variants = args.variants.split(",")
    theirs = bg.build_mlxlm(cfg, ours, args) if "mlxlm" in variants else None
    layout = bg.ExpertLayout(ours, theirs) if theirs is not None else None
    ours.eval()
    if theirs is not None:
        theirs.eval()
    prompt = mx.random.randint(0, cfg["vocab_size"], (args.prompt,), key=mx.random.key(7))
    prompt = prompt.astype(mx.uint32)
    MLP = HunYuanMoEV1MLP
    original_pre, original_mlp = fp._decode_pre, MLP.__call__
    need_qkv = any("qkv" in v for v in variants)
    need_shared = any("shared" in v for v in variants)
    for layer in ours.layers:
        a = layer.self_attn
        if need_qkv:
            layer.qkv_fused = fuse([a.q_proj, a.k_proj, a.v_proj])
        if need_shared and "shared_mlp" in layer.mlp:
            s = layer.mlp.shared_mlp
            s.gate_up_fused = fuse([s.gate_proj, s.up_proj])

    policies = bg.policies()

    def policy_of(name):  # mlx-lm's model ignores ours' policy
        return policies["plain" if name == "mlxlm" else name.split("+")[0]]

    @contextlib.contextmanager
    def variant(name):
        fp._decode_pre = fused_pre if "qkv" in name else original_pre
        MLP.__call__ = fused_shared_call if "shared" in name else original_mlp
        for layer in ours.layers:
            layer._decode_fns = None  # retrace with the patched functions
        try:
            with fp.using(ours, policy_of(name)):
                yield
        finally:
            fp._decode_pre, MLP.__call__ = original_pre, original_mlp

    res: dict[str, list] = {}
    ref_tokens = {}
    for rnd in range(args.rounds + 1):
        order = variants if rnd % 2 == 0 else variants[::-1]
        for name in order:
            if layout is not None:
                layout.activate("mlxlm" if name == "mlxlm" else "ours")
            with variant(name):
                tps, idle_ms, host, toks, prims = decode(
                    theirs if name == "mlxlm" else ours, prompt, args.gen, args.prefill_step
                )
            rec = {
                "kind": "decode",
                "device": device,
                "round": rnd,
                "variant": name,
                "policy": None if name == "mlxlm" else dataclasses.asdict(policy_of(name)),
                "tps": tps,
                "idle_build_ms": idle_ms[0],
                "idle_encode_ms": idle_ms[1],
                "idle_gpu_tail_ms": idle_ms[2],
                "primitives": sum(prims.values()),
                "step_build_ms": host[0],
                "step_async_eval_ms": host[1],
                "step_wait_ms": host[2],
                "mlx_env": bg.versions()["mlx_env"],
            }
            if rnd == 0:
                ref_tokens[name] = toks
                rec["primitive_counts"] = prims
            else:
                res.setdefault(name, []).append((tps, *idle_ms))
            rec["tokens_equal_graph"] = toks == ref_tokens.get("graph", toks)
            bg.log(rec, sink)
    for name, vals in res.items():
        tps = [v[0] for v in vals]
        bg.log(
            {
                "kind": "summary",
                "device": device,
                "variant": name,
                "tps_median": statistics.median(tps),
                "tps_min": min(tps),
                "tps_max": max(tps),
                "idle_build_ms_median": statistics.median(v[1] for v in vals),
                "idle_encode_ms_median": statistics.median(v[2] for v in vals),
                "idle_gpu_tail_ms_median": statistics.median(v[3] for v in vals),
            },
            sink,
        )
    print(json.dumps({"device": device, "versions": bg.versions()}))


if __name__ == "__main__":
    main()
