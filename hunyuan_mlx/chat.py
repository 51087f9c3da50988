"""Chat in the terminal, the KV cache kept between turns: `python -m hunyuan_mlx.chat --model M`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from mlx_lm.chat import DEFAULT_MAX_TOKENS as CHAT_MAX_TOKENS

from .cli import run_main
from .distributed import init_group
from .generation.display import ThinkingPrinter, print_stream
from .generation.options import (
    add_common_arguments,
    add_generation_arguments,
    prepare,
    rank_output,
)
from .generation.session import ChatSession

COMMANDS = {
    "/reset": "forget the conversation",
    "/think": "let the model reason before answering",
    "/no_think": "answer without reasoning",
    "/exit": "quit (or Ctrl-D)",
}



def repl(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    hide_thinking: bool = False,
    verbose: bool = False,
) -> None:
    """Read user turns and commands until /exit or end of input; errors in a turn are reported
    and the conversation goes on."""
    print("\n".join(f"{c:<10} {h}" for c, h in COMMANDS.items()), file=out)
    while True:
        try:
            line = read(">> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            session.reset()
            print("[conversation reset]", file=out)
        elif line in ("/think", "/no_think"):
            session.enable_thinking = line == "/think"
            print(f"[thinking {'on' if session.enable_thinking else 'off'}]", file=out)
        elif line:
            try:
                responses = session.send(line)
            except ValueError as e:
                print(f"error: {e}", file=out)
                continue
            printer = ThinkingPrinter(out, hide=hide_thinking)
            try:
                print_stream(responses, printer, verbose)
            except KeyboardInterrupt:
                print("\n[interrupted]", file=out)
            if verbose:
                print(f"Cache: {session.reused} prompt tokens reused", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m hunyuan_mlx.chat` flags (mlx-lm's names)."""
    parser = argparse.ArgumentParser(
        prog="python -m hunyuan_mlx.chat", description="Chat with a HunYuan model"
    )
    add_common_arguments(parser)
    add_generation_arguments(parser, max_tokens=CHAT_MAX_TOKENS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: a chat on stdin/stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        group = init_group()  # size 1 unless run by mlx.launch, which gives every rank stdin
        model, tokenizer, settings = prepare(args, group)
        session = ChatSession(model, tokenizer, settings, args.system_prompt, args.think)
        first = group.rank() == 0
        repl(
            session,
            read=input if first else lambda _: input(),  # the prompt shown once, by rank 0
            out=rank_output(group, sys.stdout),
            hide_thinking=args.hide_thinking,
            verbose=args.verbose and first,
        )


if __name__ == "__main__":
    main()
