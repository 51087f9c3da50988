"""Generate one answer: `python -m hunyuan_mlx.generate --model M --prompt "..."`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .cli import run_main
from .distributed import init_group
from .generation.display import ThinkingPrinter, print_stream
from .generation.options import (
    add_common_arguments,
    add_generation_arguments,
    prepare,
    rank_output,
)
from .generation.settings import GENERATE_MAX_TOKENS
from .generation.stream import build_prompt, require_text, stream_generate


def build_parser() -> argparse.ArgumentParser:
    """The `python -m hunyuan_mlx.generate` flags (mlx-lm's names)."""
    parser = argparse.ArgumentParser(
        prog="python -m hunyuan_mlx.generate", description="Generate text with a HunYuan model"
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--prompt", "-p", required=True, help="Message to be processed by the model ('-': stdin)"
    )
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Use the raw prompt without the tokenizer's chat template.",
    )
    add_generation_arguments(parser, max_tokens=GENERATE_MAX_TOKENS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: stream one answer to stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        # Checked before loading, which can take minutes.
        prompt = require_text(sys.stdin.read() if args.prompt == "-" else args.prompt)
        group = init_group()  # size 1 unless run by mlx.launch
        model, tokenizer, settings = prepare(args, group)
        ids = build_prompt(
            tokenizer, prompt, args.system_prompt, args.think, args.ignore_chat_template
        )
        printer = ThinkingPrinter(rank_output(group, sys.stdout), hide=args.hide_thinking)
        verbose = args.verbose and group.rank() == 0
        print_stream(stream_generate(model, tokenizer, ids, settings), printer, verbose)


if __name__ == "__main__":
    main()
