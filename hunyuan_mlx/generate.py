"""Generate text with a HunYuan checkpoint: Python API and `python -m hunyuan_mlx.generate`.

Runs mlx-lm's generation loop, samplers and KV caches; this module adds the HunYuan chat
template, the checkpoint's sampling defaults, context checks and the display of reasoning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import LogitsProcessor

from .cli import (
    GENERATE_MAX_TOKENS,
    GenerationSettings,
    ThinkingPrinter,
    add_common_arguments,
    add_generation_arguments,
    cli_errors,
    prepare,
    print_stream,
)
from .model import HunYuanMoEV1ForCausalLM
from .tokenizer import HunYuanTokenizer


def require_text(prompt: str) -> str:
    """The prompt, refused when it is empty or only whitespace."""
    if not prompt.strip():
        raise ValueError("The prompt is empty")
    return prompt


def build_prompt(
    tokenizer: HunYuanTokenizer,
    prompt: str,
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
    ignore_chat_template: bool = False,
) -> list[int]:
    """Token ids of one user turn through the chat template, or of the raw text."""
    require_text(prompt)
    if ignore_chat_template:
        if system_prompt is not None or enable_thinking is not None:
            raise ValueError("A system prompt or thinking switch needs the chat template")
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, enable_thinking=enable_thinking)


def stream_generate(
    model: HunYuanMoEV1ForCausalLM,
    tokenizer: HunYuanTokenizer,
    prompt: str | Sequence[int],
    settings: GenerationSettings | None = None,
    *,
    prompt_cache: list[Any] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Iterator[GenerationResponse]:
    """Yield mlx-lm `GenerationResponse`s (text segment, token, timing) until an eos id or
    `max_tokens`. A string prompt is encoded as is: use `build_prompt` for the chat template.

    A prompt longer than the context allowed is refused, except when continuing a `prompt_cache`
    (updated in place): its owner knows what the cache holds. `eos_token_ids` replaces the
    tokenizer's stop ids; `logits_processors` run after the repetition penalty.
    """
    settings = settings or GenerationSettings()
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("The prompt is empty")
    if prompt_cache is None:
        settings.check_prompt_fits(len(ids), model)
    wrapper = tokenizer.for_mlx_lm()
    if eos_token_ids is not None:
        wrapper.eos_token_ids = eos_token_ids
    yield from mlx_lm_stream_generate(
        model,
        wrapper,
        mx.array(ids),
        max_tokens=settings.max_tokens,
        sampler=settings.sampler(),
        logits_processors=[*settings.logits_processors(), *logits_processors],
        prompt_cache=settings.make_cache(model) if prompt_cache is None else prompt_cache,
        prefill_step_size=settings.prefill_step_size,
        kv_bits=settings.kv_bits,
        kv_group_size=settings.kv_group_size,
        quantized_kv_start=settings.quantized_kv_start,
    )


def generate(
    model: HunYuanMoEV1ForCausalLM,
    tokenizer: HunYuanTokenizer,
    prompt: str | Sequence[int],
    settings: GenerationSettings | None = None,
    **kwargs: Any,
) -> str:
    """The whole generated text (reasoning included); `stream_generate` without the streaming."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, settings, **kwargs))


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
    with cli_errors(parser.prog):
        # Checked before loading, which can take minutes.
        prompt = require_text(sys.stdin.read() if args.prompt == "-" else args.prompt)
        model, tokenizer, settings = prepare(args)
        ids = build_prompt(
            tokenizer, prompt, args.system_prompt, args.think, args.ignore_chat_template
        )
        printer = ThinkingPrinter(sys.stdout, hide=args.hide_thinking)
        print_stream(stream_generate(model, tokenizer, ids, settings), printer, args.verbose)


if __name__ == "__main__":
    main()
