"""An OpenAI-compatible HTTP server for a HunYuan checkpoint: `python -m hunyuan_mlx.server`.

Chat and text completions (JSON or streamed), with Hunyuan's reasoning and tool calls parsed out,
a prompt cache across requests, and one worker thread that owns the model and serves concurrent
requests with continuous batching (or, with --decode-concurrency 1, one at a time). Under
`mlx.launch` every rank loads its share of the model and rank 0 serves (tensor mode, or
`--pipeline`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from ..distributed import init_group, shared_seed, together
from ..generation.settings import GenerationSettings
from ..interrupts import signals_as_interrupts
from ..loading import load, resolve_model_path
from ..serve.app import DEFAULT_HOST, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PORT, Server, Service
from ..serve.engine import (
    DEFAULT_DECODE_CONCURRENCY,
    DEFAULT_PROMPT_CONCURRENCY,
    BatchEngine,
    Engine,
)
from ..serve.prompt_cache import DEFAULT_PROMPT_CACHE_SIZE, PromptCache
from . import run_main
from .options import (
    add_debug_argument,
    add_generation_arguments,
    add_model_arguments,
    command_parser,
    settings_from_args,
)

SERVER_MAX_TOKENS = 512  # mlx-lm server's --max-tokens default
MAX_PORT = 65535


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The server command's flags (mlx-lm server's names and defaults)."""
    parser = command_parser("server", prog, "OpenAI-compatible HunYuan server")
    add_model_arguments(parser)
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="Host for the HTTP server (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="Port for the HTTP server, 0 for any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--api-key", default=None, help="Require this bearer token on every request but /health"
    )
    parser.add_argument(
        "--chat-template-args",
        type=json_object,
        default="{}",
        help="JSON object of arguments for the chat template, e.g. '{\"enable_thinking\":false}' "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prompt-cache-size",
        type=int,
        default=DEFAULT_PROMPT_CACHE_SIZE,
        help="Maximum number of distinct KV caches to hold in the prompt cache "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=None,
        help="Maximum size in bytes of the KV caches (default: no limit)",
    )
    parser.add_argument(
        "--decode-concurrency",
        type=int,
        default=DEFAULT_DECODE_CONCURRENCY,
        help="Decode up to this many requests in one batch (continuous batching); 1 serves "
        "them one at a time, as does --kv-bits unless --quantized-kv-start is 0 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prompt-concurrency",
        type=int,
        default=DEFAULT_PROMPT_CONCURRENCY,
        help="Prefill up to this many prompts together when batching (default: %(default)s)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="Largest request body accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="Set the logging level (default: %(default)s)",
    )
    add_generation_arguments(parser, max_tokens=SERVER_MAX_TOKENS)
    add_debug_argument(parser)
    return parser


def check_flags(args: argparse.Namespace, group: mx.distributed.Group | None) -> None:
    """What the flags alone show wrong, before the model loads."""
    for flag in ("decode_concurrency", "prompt_concurrency", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= args.port <= MAX_PORT:  # checked before the model loads, not when binding
        raise ValueError(f"--port must be in 0..{MAX_PORT}, got {args.port}")


def queue_reason(decode_concurrency: int, defaults: GenerationSettings) -> str | None:
    """Why requests are served one at a time rather than batched (None: they are batched)."""
    if decode_concurrency == 1:
        return "--decode-concurrency 1"
    if defaults.kv_bits is not None and defaults.quantized_kv_start > 0:
        return (
            f"--kv-bits with --quantized-kv-start {defaults.quantized_kv_start} (a batch "
            "quantizes each sequence's KV cache from its first token: --quantized-kv-start 0 "
            "batches)"
        )
    return None


def build_service(args: argparse.Namespace, group: mx.distributed.Group | None = None) -> Service:
    """Load the model (under mlx.launch, this rank's share of it: `group`) and make the engine
    for parsed flags; started on rank 0, whose engine hands its jobs to the other ranks'."""
    together(group, lambda: check_flags(args, group))
    model_path = resolve_model_path(args.model)
    defaults = settings_from_args(args, model_path)
    model, tokenizer = load(
        model_path,
        adapter_path=args.adapter_path,
        group=group,
        pipeline=args.pipeline,
        fast_paths=args.fast_paths,
        memory_budget=args.memory_budget,
    )
    cache = PromptCache(args.prompt_cache_size, args.prompt_cache_bytes)
    seed = shared_seed(group, args.seed)
    queue_only = queue_reason(args.decode_concurrency, defaults)
    if queue_only:
        logging.getLogger(__name__).info("Serving one request at a time: %s", queue_only)
    if queue_only is None:
        engine: Engine = BatchEngine(
            model,
            tokenizer,
            cache,
            seed=seed,
            group=group,
            decode_concurrency=args.decode_concurrency,
            prompt_concurrency=args.prompt_concurrency,
            prefill_step_size=defaults.prefill_step_size,
        )
    else:
        engine = Engine(model, tokenizer, cache, seed=seed, group=group)
    if group is None or group.rank() == 0:
        engine.start()
    return Service(
        args.model,
        model,
        tokenizer,
        engine,
        defaults,
        template_args=args.chat_template_args,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: serve until interrupted."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s - %(levelname)s - %(message)s"
    )
    # A signal while serving ends the running requests (each with a last chunk or an error),
    # then the engine's thread, then the process with 128 + its number (Ctrl-C: 130).
    with run_main(parser.prog, args.debug), signals_as_interrupts():
        group = init_group()  # size 1 unless run by mlx.launch
        service = build_service(args, group)
        # Rank 0 serves; a port it cannot bind stops every rank.
        server = together(
            group, lambda: Server((args.host, args.port), service) if group.rank() == 0 else None
        )
        if server is None:
            service.engine.follow()
            return
        host, port = server.server_address[:2]
        print(f"Serving {args.model} on http://{host}:{port}", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
            service.engine.close()

