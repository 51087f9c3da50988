"""Generate one answer: `python -m hunyuan_mlx.generate --model M --prompt "..."`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlx_lm.generate import DEFAULT_PROMPT

from ..distributed import init_group, together
from ..generation.display import ThinkingPrinter, print_stream
from ..generation.settings import GENERATE_MAX_TOKENS
from ..generation.stream import (
    DEFAULT_NUM_DRAFT_TOKENS,
    build_prompt,
    require_text,
    stream_generate,
)
from . import run_main
from .options import (
    add_common_arguments,
    add_generation_arguments,
    command_parser,
    eos_ids,
    load_cache_file,
    load_draft,
    prepare,
    rank_output,
    template_config,
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The generate command's flags (mlx-lm's names)."""
    parser = command_parser("generate", prog, "Generate text with a HunYuan model")
    add_common_arguments(parser)
    parser.add_argument(
        "--prompt",
        "-p",
        default=DEFAULT_PROMPT,
        help="Message to be processed by the model ('-': stdin; default: %(default)r, mlx-lm's)",
    )
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Use the raw prompt without the tokenizer's chat template.",
    )
    parser.add_argument(
        "--chat-template-config",
        default=None,
        help="Extra chat template variables, a JSON object, e.g. '{\"enable_thinking\": false}'",
    )
    parser.add_argument(
        "--extra-eos-token",
        nargs="+",
        default=(),
        help="Tokens that also stop generation, each one token of the vocabulary (default: none)",
    )
    parser.add_argument(
        "--prompt-cache-file",
        default=None,
        help="A KV cache saved with mlx_lm's save_prompt_cache for this model, holding the "
        "chat template's text before the user's; the prompt continues it",
    )
    parser.add_argument(
        "--draft-model",
        default=None,
        help="A smaller HunYuan checkpoint with the same tokenizer, for speculative decoding",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=int,
        default=DEFAULT_NUM_DRAFT_TOKENS,
        help="Tokens the draft model proposes at a time (default: %(default)s)",
    )
    add_generation_arguments(parser, max_tokens=GENERATE_MAX_TOKENS)
    return parser


def refuse_stdin() -> None:
    """`--prompt -` under mlx.launch, whose ranks get no stdin: reading it would wait for ever."""
    raise ValueError(
        "--prompt - cannot read stdin under mlx.launch, which passes none to its ranks: "
        'pass the text itself, e.g. --prompt "$(cat prompt.txt)"'
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: stream one answer to stdout."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        group = init_group()  # size 1 unless run by mlx.launch
        if args.prompt == "-" and group.size() > 1:
            together(group, refuse_stdin)  # one line from rank 0, not one per rank
        # Checked before loading, which can take minutes.
        prompt = require_text(sys.stdin.read() if args.prompt == "-" else args.prompt)
        template_kwargs = template_config(args.chat_template_config)
        if args.draft_model and args.prompt_cache_file:
            raise ValueError("--draft-model cannot be combined with --prompt-cache-file")
        model, tokenizer, settings = prepare(args, group)
        cache = None if args.prompt_cache_file is None else load_cache_file(
            args.prompt_cache_file, model
        )
        draft = None if args.draft_model is None else load_draft(
            args.draft_model, tokenizer, args.dtype
        )
        ids = build_prompt(
            tokenizer,
            prompt,
            args.system_prompt,
            args.think,
            args.ignore_chat_template,
            template_kwargs,
            after_cached_prefix=cache is not None,
        )
        responses = stream_generate(
            model,
            tokenizer,
            ids,
            settings,
            prompt_cache=cache,
            eos_token_ids=eos_ids(tokenizer, args.extra_eos_token),
            draft_model=draft,
            num_draft_tokens=args.num_draft_tokens,
        )
        printer = ThinkingPrinter(rank_output(group, sys.stdout), hide=args.hide_thinking)
        print_stream(responses, printer, args.verbose and group.rank() == 0)

