"""The flags several commands share (`--debug`, `--force`; the model, prompt and sampling flags
of `generate`, `chat` and the server), and what those commands load from parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache

from ..distributed import shared_seed
from ..files import parse_size
from ..generation.settings import GenerationSettings
from ..interrupts import DEBUG_ENV
from ..loading import DEFAULT_LOAD_DTYPE, LOAD_DTYPES, load, resolve_model_path
from ..models import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
from ..models.fast_paths import POLICY_NAMES
from ..models.quantization import ROUTER_NOTE, has_quantized_router
from ..tokenizer import HunYuanTokenizer

TRUE_WORDS, FALSE_WORDS = ("true", "t", "yes", "1"), ("false", "f", "no", "0")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def command_prog(command: str) -> str:
    """`command` as the user ran it, for usage lines and errors: its console script
    (`hunyuan-mlx-<command>`) when run as one, else `python -m hunyuan_mlx.<command>`; the
    dispatcher passes `hunyuan-mlx <command>` itself."""
    script = f"hunyuan-mlx-{command}"
    return script if Path(sys.argv[0]).name == script else f"python -m hunyuan_mlx.{command}"


def command_parser(command: str, prog: str | None, description: str) -> argparse.ArgumentParser:
    """The parser of `command`, its usage and errors under `prog` (default: `command_prog`)."""
    return argparse.ArgumentParser(prog=prog or command_prog(command), description=description)


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """`--force`: replace a non-empty output folder (the commands that write one)."""
    parser.add_argument(
        "--force", action="store_true", help="Replace an existing non-empty output directory."
    )


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """`--debug`: show the traceback of an error instead of its one line."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"Print the traceback of an error (also: {DEBUG_ENV}=1)",
    )


def parse_bool(text: str) -> bool:
    """A flag's boolean value as mlx-lm spells it (`--verbose True`, `--verbose F`)."""
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_dtype_argument(
    parser: argparse.ArgumentParser, default: str | None = DEFAULT_LOAD_DTYPE
) -> None:
    """--dtype: what the loaded model computes in (float32 on the CPU backend by default);
    `lora` passes None so that its YAML config can set it."""
    parser.add_argument(
        "--dtype",
        choices=LOAD_DTYPES,
        default=default,
        help="Type of the floating weights and activations: auto is float32 on the CPU backend "
        "(where bfloat16 is slow) and the checkpoint's elsewhere; checkpoint keeps the "
        f"checkpoint's (default: {DEFAULT_LOAD_DTYPE})",
    )


def add_fast_paths_argument(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--fast-paths: the model's policy by name (`FastPaths.named`; generate, chat, lora,
    evaluate, the server); `lora` passes None so that its YAML config can set it."""
    parser.add_argument(
        "--fast-paths",
        choices=POLICY_NAMES,
        default=default,
        help="auto: this backend's fast paths with the thresholds `hunyuan-mlx tune` measured "
        "here (else built-in); cpu, cuda, metal: that backend's built-in defaults; off: the "
        "plain path (default: auto)",
    )


def memory_budget(text: str) -> int:
    """The --memory-budget value in bytes."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_memory_budget_argument(parser: argparse.ArgumentParser) -> None:
    """--memory-budget: the memory the weights may take; a model over it streams its routed
    experts from disk (generate, chat, the server, evaluate)."""
    parser.add_argument(
        "--memory-budget",
        type=memory_budget,
        default=None,
        metavar="SIZE",
        help="Memory the weights may take (e.g. 20GB): a model that does not fit keeps its routed "
        "experts on disk and reads them as tokens need them, into a cache of what is left "
        "(slower; see docs/generate.md). Default: the whole model in memory",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter-path, --pipeline and --fast-paths: what to load, how to split it under
    mlx.launch, and its fast paths (generate, chat, the server)."""
    parser.add_argument(
        "--model", required=True, help="Local checkpoint directory or Hugging Face repo id"
    )
    parser.add_argument(
        "--adapter-path", default=None, help="Directory of trained LoRA/DoRA adapters to apply"
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="Under mlx.launch: split the layers over the ranks (default there: tensor mode, "
        "every layer split)",
    )
    add_fast_paths_argument(parser)
    add_memory_budget_argument(parser)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, prompt and display flags generate and chat take."""
    add_model_arguments(parser)
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
        "--verbose",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="True|False",
        help="Print token counts, speeds and peak memory (--verbose, or mlx-lm's --verbose True)",
    )
    add_dtype_argument(parser)
    add_debug_argument(parser)


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
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    int_flags = [
        ("--repetition-context-size", "How many recent tokens the repetition penalty looks at"),
        ("--max-kv-size", "Maximum key-value cache size (a rotating window; also the longest "
         "prompt allowed)"),
        ("--kv-bits", "Number of bits for KV cache quantization"),
        ("--kv-group-size", "Group size for KV cache quantization"),
        ("--quantized-kv-start", "With --kv-bits, quantize the KV cache from this step on"),
        ("--prefill-step-size", "Number of prompt tokens to process at a time"),
    ]
    for flag, what in int_flags:
        default = getattr(d, flag[2:].replace("-", "_"))
        shown = "none" if default is None else default
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default: {shown})")


def settings_from_args(args: argparse.Namespace, model_path: Path) -> GenerationSettings:
    """The parsed flags over the checkpoint's sampling defaults, checked against its config."""
    names = [f.name for f in dataclasses.fields(GenerationSettings)]
    settings = GenerationSettings.from_checkpoint(
        model_path, **{n: getattr(args, n) for n in names}
    )
    if settings.kv_bits is not None:
        settings.check_kv_quantization(HunYuanMoEV1Config.from_pretrained(model_path))
    return settings


def prepare(
    args: argparse.Namespace, group: mx.distributed.Group | None = None
) -> tuple[HunYuanMoEV1ForCausalLM, HunYuanTokenizer, GenerationSettings]:
    """Model, tokenizer and settings for parsed CLI flags; seeds the PRNG when asked to. With a
    `group` of several ranks, this rank's share of the model and a seed every rank shares."""
    model_path = resolve_model_path(args.model)
    settings = settings_from_args(args, model_path)
    model, tokenizer = load(
        model_path,
        adapter_path=args.adapter_path,
        dtype=args.dtype,
        group=group,
        pipeline=args.pipeline,
        fast_paths=args.fast_paths,
        memory_budget=args.memory_budget,
    )
    if args.verbose and (group is None or group.rank() == 0):
        print(f"Fast paths: {model.fast_paths.describe()}", file=sys.stderr)
        if has_quantized_router(model):
            print(ROUTER_NOTE.format(path=args.model), file=sys.stderr)
    seed = shared_seed(group, args.seed)
    if seed is not None:
        mx.random.seed(seed)
    return model, tokenizer, settings


def rank_output(group: mx.distributed.Group, out: TextIO) -> TextIO:
    """`out` on rank 0, which prints for all; a sink on the other ranks."""
    return out if group.rank() == 0 else open(os.devnull, "w")


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
    if draft_tokenizer.token_bytes != tokenizer.token_bytes:
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
