"""Run by test_distributed.py on every rank of `mlx.launch`, and in the test's own process for
the reference: each case's logits for a prefill and greedy cached decode steps.

`python tests/distributed_worker.py CASES.json OUT.npz [--pipeline] [--generate JSON]`: rank 0
saves the logits; then, given flags, every rank runs the generate command's `main` with them (and
`--pipeline`), which prints on rank 0. One launch for both: starting ranks is the slow part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import make_prompt_cache

from hunyuan_mlx import load_model
from hunyuan_mlx.cli.generate import main as generate_main
from hunyuan_mlx.distributed import init_group
from hunyuan_mlx.models import FastPaths
from hunyuan_mlx.models.fast_paths import set_fast_paths

# Long enough that the prefill takes the padded experts (rows = tokens x top-k >= the CPU's 64).
PROMPT = [(7 * i + 3) % 90 for i in range(40)]
DECODE_STEPS = 3


def case_logits(
    case: dict[str, Any],
    group: mx.distributed.Group | None,
    pipeline: bool,
    decode_graph: bool = True,
):
    """Prefill logits (L, vocab), then those of `DECODE_STEPS` greedy steps (steps, vocab); the
    steps as the whole model's decode graph (tensor mode: its all_sums inside) unless pipelined
    or `decode_graph` is off."""
    model = load_model(
        case["model"], adapter_path=case.get("adapters"), group=group, pipeline=pipeline
    )
    # The CPU pads half-precision rows only: these float32 models are made to, so that the
    # padded experts meet the sharded ones.
    policy = dataclasses.replace(
        FastPaths.default(), padded_float32=True, decode_graph=decode_graph
    )
    set_fast_paths(model, policy)
    cache = make_prompt_cache(model)
    logits = model(mx.array([PROMPT]), cache)[0]
    prefill, steps = logits, []
    for _ in range(DECODE_STEPS):
        # From the first step on, the cache is quantized when the case asks (mlx-lm's switch).
        maybe_quantize_kv_cache(cache, 0, 32, case.get("kv_bits"))
        token = mx.argmax(logits[-1])
        logits = model(token.reshape(1, 1), cache)[0]
        steps.append(logits[-1])
    if decode_graph and not pipeline and model.model._decode_graphs is None:
        raise RuntimeError(f"{case}: the decode steps did not take the decode graph")
    return np.array(prefill), np.array(mx.stack(steps))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("out")
    parser.add_argument("--pipeline", action="store_true")
    parser.add_argument("--generate", default=None, help="generate flags, a JSON list")
    args = parser.parse_args()
    group = init_group()
    results = {}
    for name, case in json.loads(open(args.cases).read()).items():
        results[f"{name}.prefill"], results[f"{name}.decode"] = case_logits(
            case, group, args.pipeline
        )
    if group.rank() == 0:
        np.savez(args.out, **results)
    if args.generate:
        generate_main(json.loads(args.generate) + (["--pipeline"] if args.pipeline else []))


if __name__ == "__main__":
    main()
