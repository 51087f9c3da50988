"""Generate text with a HunYuan model: the chat-template prompt and the streaming loop.

Runs mlx-lm's generation loop, samplers and KV caches; this module adds the HunYuan chat
template, the checkpoint's sampling defaults, context checks and the display of reasoning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import LogitsProcessor, Sampler

from ..models import HunYuanMoEV1ForCausalLM
from ..tokenizer import HunYuanTokenizer
from .settings import GenerationSettings

DEFAULT_NUM_DRAFT_TOKENS = 3  # mlx-lm generate's --num-draft-tokens
# Where the user's text goes when only the part of a prompt after a cached prefix is wanted.
QUERY_MARK = "<query>"


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
    template_kwargs: dict[str, Any] | None = None,
    after_cached_prefix: bool = False,
) -> list[int]:
    """Token ids of one user turn through the chat template (with extra template variables), or
    of the raw text. `after_cached_prefix` keeps only what follows the template's text before
    the user's (as mlx-lm does for a saved prompt cache holding that prefix)."""
    require_text(prompt)
    if ignore_chat_template:
        if system_prompt is not None or enable_thinking is not None or template_kwargs:
            raise ValueError("A system prompt, thinking switch or template config needs the "
                             "chat template")  # fmt: skip
        return tokenizer.encode(prompt)

    variables = dict(template_kwargs or {})
    if enable_thinking is not None:  # the switch wins over the same template variable
        variables["enable_thinking"] = enable_thinking

    def render(user_text: str) -> str:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_text})
        return tokenizer.apply_chat_template(messages, tokenize=False, **variables)

    text = render(prompt)
    if after_cached_prefix:
        text = text[render(QUERY_MARK).index(QUERY_MARK) :]
    return tokenizer.encode(text)


def stream_generate(
    model: HunYuanMoEV1ForCausalLM,
    tokenizer: HunYuanTokenizer,
    prompt: str | Sequence[int],
    settings: GenerationSettings | None = None,
    *,
    prompt_cache: list[Any] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    sampler: Sampler | None = None,
) -> Iterator[GenerationResponse]:
    """Yield mlx-lm `GenerationResponse`s (text segment, token, timing) until an eos id or
    `max_tokens`. A string prompt is encoded as is: use `build_prompt` for the chat template.

    A prompt longer than the context allowed is refused, except when continuing a `prompt_cache`
    (updated in place): its owner knows what the cache holds. `eos_token_ids` replaces the
    tokenizer's stop ids; `logits_processors` run after the repetition penalty. A `draft_model`
    (same tokenizer) drafts `num_draft_tokens` at a time for speculative decoding; a given
    `prompt_cache` then holds the model's layers followed by the draft's. `sampler` replaces
    `settings.sampler()` (the server's: one with a PRNG key of its own).
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
    if prompt_cache is None:
        prompt_cache = settings.make_cache(model)
        if draft_model is not None:
            prompt_cache += settings.make_cache(draft_model)
    speculative = {} if draft_model is None else {"num_draft_tokens": num_draft_tokens}
    yield from mlx_lm_stream_generate(
        model,
        wrapper,
        mx.array(ids),
        max_tokens=settings.max_tokens,
        sampler=sampler or settings.sampler(),
        logits_processors=[*settings.logits_processors(), *logits_processors],
        prompt_cache=prompt_cache,
        prefill_step_size=settings.prefill_step_size,
        kv_bits=settings.kv_bits,
        kv_group_size=settings.kv_group_size,
        quantized_kv_start=settings.quantized_kv_start,
        draft_model=draft_model,
        **speculative,
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


