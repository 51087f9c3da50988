"""What quantization cost: `python -m hunyuan_mlx.evaluate --model Q [--reference R] --data FILE`.

Perplexity of the model on the data (a .txt or .md file, JSONL text / chat / prompt-completion
records with the loss on the answer only, or a data directory's test.jsonl), with its standard
error and throughput; with `--reference` (say the bf16 or 8-bit conversion of the same model),
also the reference's, and the KL divergence and top-1 agreement of their next-token distributions,
the two run in turn over the same windows (see `hunyuan_mlx.evaluation`). A first line on stderr
says how many tokens will be scored, and a progress bar each pass's tokens scored, tokens/s and
time left. Flags follow mlx_lm.perplexity.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from ..evaluation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_SEQUENCE_LENGTH,
    check_batch_size,
    check_fits,
    check_same_vocabulary,
    check_tokens,
    data_file,
    evaluate,
    make_windows,
    read_data,
    sample_windows,
    scored_tokens,
)
from ..loading import load_model, resolve_model_path
from ..tokenizer import HunYuanTokenizer
from . import run_main
from .options import (
    add_debug_argument,
    add_fast_paths_argument,
    add_memory_budget_argument,
    command_parser,
)

GB = 1e9


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command's flags; names and meanings follow mlx_lm.perplexity."""
    parser = command_parser(
        "evaluate", prog, "Perplexity of a HunYuan model and its divergence from a reference"
    )
    parser.add_argument("--model", required=True, help="Checkpoint directory or Hub repo id")
    parser.add_argument(
        "--reference",
        default=None,
        help="Checkpoint to compare against (e.g. the bf16 or 8-bit conversion of the same model)",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="A .txt or .md file (one document), a JSONL file of text, chat or prompt/completion "
        "records (any other file is read as JSON lines), or a data directory (its test.jsonl, "
        "else valid.jsonl)",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=DEFAULT_SEQUENCE_LENGTH,
        help="Longest window in tokens; longer examples are cut (default: %(default)s)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        help="Number of windows, drawn at random; -1 for all (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="Seed of that draw (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="Windows per forward pass (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON line of results")
    add_fast_paths_argument(parser)
    add_memory_budget_argument(parser)
    add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check everything that can be checked before the long passes, then evaluate."""
    check_batch_size(args.batch_size)
    data = data_file(args.data)
    paths = {"model": resolve_model_path(args.model)}
    if args.reference is not None:
        paths["reference"] = resolve_model_path(args.reference)
    loader = functools.partial(
        load_model, memory_budget=args.memory_budget, fast_paths=args.fast_paths
    )
    # Lazy loads read only the configs and safetensors headers: a broken checkpoint fails now,
    # not after the reference's pass.
    configs = {name: loader(path, lazy=True).config for name, path in paths.items()}
    for name, config in configs.items():
        check_fits(config, args.sequence_length, f"the {name}")
    if "reference" in configs:
        check_same_vocabulary(configs["model"].vocab_size, configs["reference"].vocab_size)
    tokenizer = HunYuanTokenizer.from_pretrained(paths["model"])
    windows = make_windows(read_data(data, tokenizer), args.sequence_length)
    if not windows:
        raise ValueError(f"Data {args.data} has no tokens to score (an empty data set)")
    available = len(windows)
    windows = sample_windows(windows, args.num_samples, args.seed)
    for name, config in configs.items():
        check_tokens(windows, config.vocab_size, f"the {name}")
    passes = "the reference, then the model" if "reference" in paths else "the model"
    print(
        f"Scoring {scored_tokens(windows)} tokens ({len(windows)} "
        f"window{'s' if len(windows) > 1 else ''} of at most "
        f"{args.sequence_length} tokens from {args.data}) with {passes}",
        file=sys.stderr,
    )
    mx.reset_peak_memory()
    result = evaluate(
        lambda: loader(paths["model"]),
        windows,
        (lambda: loader(paths["reference"])) if "reference" in paths else None,
        args.batch_size,
    )
    return {
        "model": args.model,
        "reference": args.reference,
        "data": args.data,
        "sequence_length": args.sequence_length,
        "windows": len(windows),
        "windows_available": available,
        **result.to_dict(),
        "peak_memory_gb": mx.get_peak_memory() / GB,
    }


def format_table(record: dict[str, Any]) -> str:
    """The results of `run` as a readable table."""
    columns = ["model", "reference"] if record["reference"] is not None else ["model"]
    prefixes = ["", "reference_"][: len(columns)]

    def ppl(prefix: str) -> str:
        se = record[f"{prefix}perplexity_se"]
        return f"{record[f'{prefix}perplexity']:.4f}" + (f" ± {se:.4f}" if se is not None else "")

    rows = [
        ["", *columns],
        ["checkpoint", *(record[c] for c in columns)],
        ["perplexity", *(ppl(p) for p in prefixes)],
        ["tokens/s", *(f"{record[f'{p}tokens_per_sec']:.1f}" for p in prefixes)],
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(
        f"{record['tokens']} tokens scored in {record['windows']} of {record['windows_available']} "
        f"windows of at most {record['sequence_length']} tokens from {record['data']}"
    )
    if record["reference"] is not None:
        ratio_se = record["perplexity_ratio_se"]
        lines += [
            f"KL(reference || model): mean {record['kl_mean']:.5f}, "
            f"99th percentile {record['kl_p99']:.5f}",
            f"top-1 agreement: {record['top1_agreement']:.4f}",
            f"perplexity ratio model / reference: {record['perplexity_ratio']:.5f}"
            + (f" ± {ratio_se:.5f} (paired)" if ratio_se is not None else ""),
        ]
    lines.append(f"peak memory: {record['peak_memory_gb']:.3f} GB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: results on stdout; a user's error is one line on stderr and exit 1."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        record = run(args)
    print(json.dumps(record) if args.json else format_table(record))

