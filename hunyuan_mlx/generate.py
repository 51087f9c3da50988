"""Generate one answer: `python -m hunyuan_mlx.generate --model M --prompt "..."`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from mlx_lm.generate import DEFAULT_PROMPT
from mlx_lm.models.cache import load_prompt_cache

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
from .generation.stream import (
    DEFAULT_NUM_DRAFT_TOKENS,
    build_prompt,
    require_text,
    stream_generate,
)
from .loading import load
from .models import HunYuanMoEV1ForCausalLM
from .tokenizer import HunYuanTokenizer


def build_parser() -> argparse.ArgumentParser:
    """The `python -m hunyuan_mlx.generate` flags (mlx-lm's names)."""
    parser = argparse.ArgumentParser(
        prog="python -m hunyuan_mlx.generate", description="Generate text with a HunYuan model"
    )
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
        help="Tokens that also stop generation (each one token of the vocabulary)",
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


def template_config(text: str | None) -> dict[str, Any]:
    """The --chat-template-config JSON object (empty when not given)."""
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("--chat-template-config must be a JSON object")
    return config


def eos_ids(tokenizer: HunYuanTokenizer, extra: Sequence[str]) -> list[int] | None:
    """The tokenizer's stop ids plus those of `extra` tokens; None (the tokenizer's) without."""
    if not extra:
        return None
    ids = list(tokenizer.eos_token_ids)
    for token in extra:
        found = tokenizer.convert_tokens_to_ids(token)
        encoded = tokenizer.encode(token)
        if found is None and len(encoded) == 1:
            found = encoded[0]
        if found is None:
            raise ValueError(f"--extra-eos-token {token!r} is not one token of the vocabulary")
        ids.append(found)
    return ids


def load_draft(
    path: str, tokenizer: HunYuanTokenizer, dtype: str
) -> HunYuanMoEV1ForCausalLM:
    """The --draft-model, which must be a HunYuan checkpoint with the model's tokenizer."""
    need = "the draft model must be a HunYuan checkpoint with the same tokenizer"
    try:
        draft, draft_tokenizer = load(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"--draft-model {path}: {e} ({need})") from e
    if draft_tokenizer is None or draft_tokenizer.token_bytes != tokenizer.token_bytes:
        raise ValueError(f"--draft-model {path}: its tokenizer differs from the model's ({need})")
    return draft


def load_cache_file(path: str, model: HunYuanMoEV1ForCausalLM) -> list[Any]:
    """A saved prompt cache, checked to have one entry per layer of `model`."""
    cache = load_prompt_cache(path)
    if len(cache) != len(model.layers):
        raise ValueError(
            f"--prompt-cache-file {path} holds {len(cache)} layers; the model has "
            f"{len(model.layers)}"
        )
    return cache


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: stream one answer to stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        # Checked before loading, which can take minutes.
        prompt = require_text(sys.stdin.read() if args.prompt == "-" else args.prompt)
        template_kwargs = template_config(args.chat_template_config)
        if args.draft_model and args.prompt_cache_file:
            raise ValueError("--draft-model cannot be combined with --prompt-cache-file")
        group = init_group()  # size 1 unless run by mlx.launch
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


if __name__ == "__main__":
    main()
