"""What `hunyuan_mlx.generate` and `hunyuan_mlx.chat` share: generation settings, their flags,
loading, one-line error reporting, and the display of the model's `<think>` reasoning."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
from mlx_lm.generate import DEFAULT_MAX_TOKENS as GENERATE_MAX_TOKENS
from mlx_lm.generate import (
    DEFAULT_MIN_P,
    DEFAULT_PREFILL_STEP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    GenerationResponse,
)
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import LogitsProcessor, Sampler, make_logits_processors, make_sampler

from .loading import load, resolve_model_path
from .model import HunYuanMoEV1ForCausalLM
from .tokenizer import HunYuanTokenizer

GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_REPETITION_CONTEXT_SIZE = 20  # mlx-lm's make_logits_processors default
DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports
KV_GROUP_SIZES = (32, 64, 128)
ROTATING_CACHE_KEEP = 4  # mlx-lm keeps the first tokens of a rotating cache (attention sink)
# generation_config.json key -> GenerationSettings field
SAMPLING_KEYS = {
    "temperature": "temp",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}
THINK_START, THINK_END = "<think>", "</think>"
DIM, RESET = "\033[2m", "\033[0m"


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: length, sampling and KV cache; defaults are mlx-lm's (greedy)."""

    max_tokens: int = GENERATE_MAX_TOKENS
    temp: float = DEFAULT_TEMP
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repetition_penalty: float | None = None
    repetition_context_size: int = DEFAULT_REPETITION_CONTEXT_SIZE
    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens > 0 or self.max_tokens == -1, "max_tokens must be > 0 (or -1)"),
            (self.temp >= 0, "temp must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (
                self.repetition_penalty is None or self.repetition_penalty > 0,
                "repetition_penalty must be > 0",
            ),
            (self.repetition_context_size > 0, "repetition_context_size must be > 0"),
            (self.max_kv_size is None or self.max_kv_size > 0, "max_kv_size must be > 0"),
            (self.kv_bits is None or self.kv_bits in KV_BITS, f"kv_bits must be one of {KV_BITS}"),
            (
                self.kv_group_size in KV_GROUP_SIZES,
                f"kv_group_size must be one of {KV_GROUP_SIZES}",
            ),
            (self.quantized_kv_start >= 0, "quantized_kv_start must be >= 0"),
            (self.prefill_step_size > 0, "prefill_step_size must be > 0"),
            # mlx-lm cannot quantize a rotating cache.
            (
                self.kv_bits is None or self.max_kv_size is None,
                "kv_bits cannot be combined with max_kv_size",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid generation setting: {message}")

    @classmethod
    def from_checkpoint(cls, model_path: str | Path, **overrides: Any) -> GenerationSettings:
        """Sampling from the checkpoint's generation_config.json; non-None overrides win."""
        file = Path(model_path) / GENERATION_CONFIG_FILE
        values: dict[str, Any] = {}
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from e
            values = {f: config[k] for k, f in SAMPLING_KEYS.items() if config.get(k) is not None}
            # As in transformers, whose GenerationConfig is greedy unless do_sample is true.
            if not config.get("do_sample", False):
                values["temp"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def sampler(self) -> Sampler:
        """mlx-lm's sampler for these settings (greedy at temp 0)."""
        return make_sampler(self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> list[LogitsProcessor]:
        """mlx-lm's repetition penalty, when one is set."""
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
        )

    def make_cache(self, model: HunYuanMoEV1ForCausalLM) -> list[Any]:
        """A fresh KV cache: rotating when `max_kv_size` is set (the model's own is unbounded)."""
        if self.max_kv_size is None:
            return make_prompt_cache(model)
        return [
            RotatingKVCache(max_size=self.max_kv_size, keep=ROTATING_CACHE_KEEP)
            for _ in model.layers
        ]

    def check_prompt_fits(self, n_tokens: int, model: HunYuanMoEV1ForCausalLM) -> None:
        """Refuse a prompt longer than the model's context or the `max_kv_size` window."""
        limit = model.config.max_position_embeddings
        source = "the model's max_position_embeddings"
        if self.max_kv_size is not None and self.max_kv_size < limit:
            limit, source = self.max_kv_size, "max_kv_size"
        if n_tokens > limit:
            raise ValueError(f"The prompt has {n_tokens} tokens, more than {limit} ({source})")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and the prompt and display flags both CLIs take."""
    parser.add_argument(
        "--model", required=True, help="Local checkpoint directory or Hugging Face repo id"
    )
    parser.add_argument(
        "--adapter-path", default=None, help="Directory of trained LoRA/DoRA adapters to apply"
    )
    parser.add_argument(
        "--system-prompt", default=None, help="System prompt to be used for the chat template"
    )
    parser.add_argument(
        "--think",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="The chat template's enable_thinking (default: the template's, which thinks); "
        "a prompt starting with /no_think also turns thinking off",
    )
    parser.add_argument(
        "--hide-thinking",
        action="store_true",
        help="Print only the answer, not the <think> reasoning (dimmed otherwise on a terminal)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Print token counts, speeds and peak memory"
    )


def add_generation_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """Length, sampling and KV-cache flags; defaults None mean the checkpoint's or mlx-lm's."""
    d = GenerationSettings()
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=max_tokens,
        help="Maximum number of tokens to generate, -1 for no limit (default: %(default)s)",
    )
    sampling = [
        ("--temp", float, "Sampling temperature", d.temp),
        ("--top-p", float, "Sampling top-p", d.top_p),
        ("--top-k", int, "Sampling top-k", d.top_k),
        ("--min-p", float, "Sampling min-p", d.min_p),
        ("--repetition-penalty", float, "Penalty for repeated tokens", "none"),
    ]
    for flag, kind, what, default in sampling:
        parser.add_argument(
            flag,
            type=kind,
            help=f"{what} (default: the checkpoint's generation_config.json, else {default})",
        )
    parser.add_argument(
        "--repetition-context-size",
        type=int,
        default=d.repetition_context_size,
        help="How many recent tokens the repetition penalty looks at (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument(
        "--max-kv-size",
        type=int,
        default=d.max_kv_size,
        help="Maximum key-value cache size (a rotating window); also the longest prompt allowed",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=d.kv_bits,
        help="Number of bits for KV cache quantization. Defaults to no quantization.",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        default=d.kv_group_size,
        help="Group size for KV cache quantization (default: %(default)s)",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=d.quantized_kv_start,
        help="With --kv-bits, quantize the KV cache from this step on (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=d.prefill_step_size,
        help="Number of prompt tokens to process at a time (default: %(default)s)",
    )


def settings_from_args(args: argparse.Namespace, model_path: Path) -> GenerationSettings:
    """The parsed flags over the checkpoint's sampling defaults."""
    names = [f.name for f in dataclasses.fields(GenerationSettings)]
    return GenerationSettings.from_checkpoint(model_path, **{n: getattr(args, n) for n in names})


def prepare(
    args: argparse.Namespace,
) -> tuple[HunYuanMoEV1ForCausalLM, HunYuanTokenizer, GenerationSettings]:
    """Model, tokenizer and settings for parsed CLI flags; seeds the PRNG when asked to."""
    model_path = resolve_model_path(args.model)
    settings = settings_from_args(args, model_path)
    model, tokenizer = load(model_path, adapter_path=args.adapter_path)
    if tokenizer is None:
        raise FileNotFoundError(f"No tokenizer (hy.tiktoken or tokenizer.json) in {model_path}")
    if args.seed is not None:
        mx.random.seed(args.seed)
    return model, tokenizer, settings


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and exit status 1 (130: Ctrl-C)."""
    try:
        yield
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None


class ThinkingPrinter:
    """Prints streamed text as is, except the `<think>...</think>` part: dimmed when writing to a
    terminal, or left out with `hide`. Tags split across chunks are held back until resolved."""

    def __init__(self, out: TextIO, hide: bool = False, dim: bool | None = None) -> None:
        self.out = out
        self.hide = hide
        self.dim = out.isatty() if dim is None else dim
        self.thinking = False
        self._pending = ""

    def write(self, text: str) -> None:
        """Print what can be classified of `text`; a possible partial tag waits for more."""
        self._pending += text
        while True:
            tag = THINK_END if self.thinking else THINK_START
            i = self._pending.find(tag)
            if i < 0:
                break
            self._emit(self._pending[:i] + (tag if self.thinking else ""))
            self.thinking = not self.thinking
            self._pending = self._pending[i + len(tag) :]
            if self.thinking:
                self._emit(tag)
        keep = _partial_suffix(self._pending, THINK_END if self.thinking else THINK_START)
        self._emit(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]

    def finish(self) -> None:
        """Print what is held back; say so when hidden reasoning never reached an answer."""
        self._emit(self._pending)
        self._pending = ""
        if self.thinking and self.hide:
            print("[reasoning hidden: it did not finish within --max-tokens]", file=sys.stderr)
        self.thinking = False
        self.out.flush()

    def _emit(self, text: str) -> None:
        if not text or (self.thinking and self.hide):
            return
        if self.thinking and self.dim:
            text = DIM + text + RESET
        self.out.write(text)
        self.out.flush()


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def print_stream(
    responses: Iterable[GenerationResponse], printer: ThinkingPrinter, verbose: bool
) -> GenerationResponse | None:
    """Stream responses through `printer`; with `verbose`, then print counts, speeds and memory."""
    last = None
    for last in responses:
        printer.write(last.text)
    printer.finish()
    printer.out.write("\n")
    if verbose and last is not None:
        print(format_stats(last), file=sys.stderr)
    return last


def format_stats(response: GenerationResponse) -> str:
    """mlx-lm's verbose summary of one generation."""
    return (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {response.peak_memory:.3f} GB"
    )
