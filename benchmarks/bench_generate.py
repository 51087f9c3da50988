"""Generation speed of this project's HunYuan model against mlx-lm's, on the same random weights.

Builds a model of the release's structure (`config.json` of Hunyuan-A13B) from random quantized
weights directly in MLX, layer by layer (the bf16 model never exists), then in one process, on the
same weights, times this project's `HunYuanMoEV1ForCausalLM` and mlx-lm's `models.hunyuan.Model`,
interleaved over several rounds:

- prefill tokens/s (prompt to first token) and decode tokens/s (the next `--gen` tokens), after
  each `--prompt-lens` prompt, through a copy of `mlx_lm.generate.generate_step`'s loop (chunks
  of `--prefill-step`, cache evaluated per chunk, the last prompt token run as the first step,
  decode pipelined with `async_eval`), so both models are driven exactly as `stream_generate`
  drives them;
- peak memory over prefill and over decode (`mx.get_peak_memory`, weights included);
- the same for this project's other policies on the same weights (`a13b.policies`):
  `ours_plain` (fast paths off), `ours_layer` (each layer's compiled decode step), `ours_graph`
  (the whole model's decode step as one compiled graph);
- next-token agreement of this project's timed path with its plain path (fast paths off, when the
  project has any), and, for information only, with mlx-lm (which skips the top-k renormalisation,
  so it is not expected to agree).

Sharing weights. Everything but the experts' gate and up projections is one set of arrays that
both models point at. This project stores gate+up fused, (E, 2I, ...); mlx-lm stores them apart.
Two copies of them (~29 GB at full shape, 4-bit) would not fit an 80 GB card beside the rest, so
the benchmark keeps one layout at a time and converts exactly (slice / concatenate of the packed
words, scales and biases, one layer at a time) when it switches model: the bits are identical.

One JSON line per measurement on stdout (and in `--out`), then a summary line per metric with
medians, min/max and the ratio ours / mlx-lm. Example (full shape, GPU machine):

    python -m benchmarks.bench_generate --rounds 3 --out $OUT/bench.jsonl

Reduced shape on a CPU:

    python -m benchmarks.bench_generate --layers 4 --width-scale 0.125 --prompt-lens 128,512 \
        --gen 16 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks.a13b import (
    GB,
    ExpertLayout,
    add_model_args,
    build_mlxlm,
    build_ours,
    device_name,
    generate,
    log,
    plain_paths,
    policies,
    release_config,
    versions,
)
from hunyuan_mlx.models.fast_paths import POLICY_NAMES, FastPaths, using

# Each of this project's model names and the policy (`a13b.policies`) it runs under.
OURS = {"ours": "default", "ours_layer": "layer", "ours_graph": "graph", "ours_plain": "plain"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--prompt-lens", default="512,4096")
    ap.add_argument("--gen", type=int, default=64, help="tokens decoded after each prompt")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up")
    ap.add_argument("--models", default="ours,mlxlm", help="of mlxlm, " + ", ".join(OURS))
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    ap.add_argument(
        "--fast-paths",
        choices=POLICY_NAMES,
        default="auto",
        help="ours's policy (FastPaths.named; ours_layer and ours_graph vary its decode step)",
    )
    args = ap.parse_args()

    sink = open(args.out, "w") if args.out else None
    mx.random.seed(args.seed)
    cfg = release_config(args)
    args._layers = cfg["num_hidden_layers"]
    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    models = args.models.split(",")
    head = {
        "device": device_name(),
        "versions": versions(),
        "shape": {
            k: cfg[k]
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "num_experts",
                "vocab_size",
            )
        }
        | {"moe_topk": topk[0] if isinstance(topk := cfg["moe_topk"], list) else topk},
        "quant": {"bits": args.bits, "group_size": args.group_size, "recipe": args.recipe},
        "argv": sys.argv[1:],
    }
    log({"kind": "setup", **head}, sink)

    t = time.perf_counter()
    ours = build_ours(cfg, args)
    weights_gb = sum(v.nbytes for _, v in tree_flatten(ours.parameters())) / GB
    log(
        {
            "kind": "built",
            "model": "ours",
            "weights_gb": weights_gb,
            "active_gb": mx.get_active_memory() / GB,
            "s": time.perf_counter() - t,
        },
        sink,
    )
    theirs = build_mlxlm(cfg, ours, args) if "mlxlm" in models else None
    layout = ExpertLayout(ours, theirs) if theirs is not None else None
    # As `load` leaves them: inference mode (this project's fast paths are for inference only).
    ours.eval()
    if theirs is not None:
        theirs.eval()
    named_policies = policies(FastPaths.named(args.fast_paths))

    prompts = {
        n: mx.random.randint(0, cfg["vocab_size"], (n,), key=mx.random.key(1000 + n)).astype(
            mx.uint32
        )
        for n in prompt_lens
    }
    mx.eval(list(prompts.values()))

    results: dict[tuple[str, int, str], list[float]] = {}
    tokens: dict[tuple[str, int], list[int]] = {}
    firsts: dict[tuple[str, int], mx.array] = {}
    for rnd in range(args.rounds + 1):  # round 0 warms every (model, length) up
        order = models if rnd % 2 == 0 else models[::-1]
        for name in order:
            if layout is not None:
                layout.activate("mlxlm" if name == "mlxlm" else "ours")
            for n in prompt_lens:
                if name == "mlxlm":
                    r = generate(theirs, prompts[n], args.gen, args.prefill_step)
                    policy = None
                else:
                    policy = named_policies[OURS[name]]
                    with using(ours, policy):
                        r = generate(ours, prompts[n], args.gen, args.prefill_step)
                    policy = dataclasses.asdict(policy)
                rec = {k: v for k, v in r.items() if k not in ("tokens", "first_logprobs")}
                log(
                    {
                        "kind": "run",
                        "device": head["device"],
                        "fast_paths": {"mlxlm": None, "ours_plain": "off"}.get(
                            name, args.fast_paths
                        ),
                        "policy": policy,
                        "round": rnd,
                        "warmup": rnd == 0,
                        "model": name,
                        "prompt": n,
                        "gen": args.gen,
                        **rec,
                    },
                    sink,
                )
                if rnd == 0:
                    tokens[(name, n)] = r["tokens"]
                    firsts[(name, n)] = r["first_logprobs"]
                    log({"kind": "tokens", "model": name, "prompt": n, "tokens": r["tokens"]}, sink)
                    continue
                for k in ("prefill_tps", "decode_tps", "prefill_peak_gb", "decode_peak_gb"):
                    results.setdefault((name, n, k), []).append(rec[k])
                if r["tokens"] != tokens[(name, n)]:
                    log(
                        {
                            "kind": "warning",
                            "msg": "tokens differ between rounds",
                            "model": name,
                            "prompt": n,
                        },
                        sink,
                    )

    if layout is not None:
        layout.activate("ours")
    if not args.no_agreement:
        with plain_paths(ours):
            for n in prompt_lens:
                r = generate(ours, prompts[n], args.gen, args.prefill_step)
                fast, plain = tokens[("ours", n)], r["tokens"]
                same = next((i for i, (a, b) in enumerate(zip(fast, plain)) if a != b), len(fast))
                diff = mx.abs(firsts[("ours", n)] - r["first_logprobs"]).max().item()
                rec = {
                    "kind": "agreement",
                    "prompt": n,
                    "vs": "ours-plain",
                    "leading_equal_tokens": same,
                    "of": len(fast),
                    "first_token_equal": fast[0] == plain[0],
                    "first_logprob_max_abs_diff": diff,
                }
                if ("mlxlm", n) in tokens:
                    other = tokens[("mlxlm", n)]
                    rec["mlxlm_leading_equal_tokens_info"] = next(
                        (i for i, (a, b) in enumerate(zip(fast, other)) if a != b), len(fast)
                    )
                log(rec, sink)

    def summary(vals):
        return {
            "median": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
        }

    table = []
    for n in prompt_lens:
        for k in ("prefill_tps", "decode_tps", "prefill_peak_gb", "decode_peak_gb"):
            rec = {"kind": "summary", "device": head["device"], "prompt": n, "metric": k}
            for name in models:
                rec[name] = summary(results[(name, n, k)])
            if "ours" in models and "mlxlm" in models:
                rec["ratio_ours_over_mlxlm"] = rec["ours"]["median"] / rec["mlxlm"]["median"]
            for other in ("ours_layer", "ours_graph", "ours_plain"):
                if "ours" in models and other in models:
                    rec[f"ratio_ours_over_{other[5:]}"] = (
                        rec["ours"]["median"] / rec[other]["median"]
                    )
            log(rec, sink)
            table.append(rec)
    log({"kind": "done", "weights_gb": weights_gb, **head}, sink)
    cols = [m for m in ("ours", "mlxlm", *list(OURS)[1:]) if m in models]
    print(
        "\nprompt metric          "
        + "".join(f"{c + ' med [min..max]':>30s}" for c in cols)
        + "  ours/mlxlm  ours/layer  ours/graph  ours/plain"
    )
    for rec in table:
        cells = "".join(
            f"{rec[c]['median']:>12.2f} [{rec[c]['min']:.2f}..{rec[c]['max']:.2f}]".rjust(30)
            for c in cols
        )
        ratios = (rec.get(f"ratio_ours_over_{m}") for m in ("mlxlm", "layer", "graph", "plain"))
        print(
            f"{rec['prompt']:6d} {rec['metric']:16s}{cells}"
            + "".join(f"  {'-' if r is None else f'{r:.2f}':>10s}" for r in ratios)
        )
    if sink is not None:
        sink.close()


if __name__ == "__main__":
    main()
