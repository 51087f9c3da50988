"""Chat in the terminal, the KV cache kept between turns: `python -m hunyuan_mlx.chat --model M`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from mlx_lm.chat import DEFAULT_MAX_TOKENS as CHAT_MAX_TOKENS

from ..distributed import init_group
from ..generation.display import ThinkingPrinter, print_stream
from ..generation.session import ChatSession
from . import run_main
from .options import (
    add_common_arguments,
    add_generation_arguments,
    command_parser,
    prepare,
    rank_output,
)

BLOCK = '"""'  # a line with only this opens, and closes, a multi-line message
QUIT_WORDS = ("/exit", "/quit", "q")  # q: as mlx-lm's chat
THINKING = ("/think", "/no_think")  # alone a switch; followed by text, part of the message
COMMANDS = {
    "/reset": "forget the conversation",
    "/think": "let the model reason before answering",
    "/no_think": "answer without reasoning",
    BLOCK: f"start a multi-line message (to paste long text); a line with only {BLOCK} sends it",
    "/exit": "quit (also /quit, q, or Ctrl-D)",
}
HELP = "\n".join(f"{c:<10} {h}" for c, h in COMMANDS.items())
PROMPT, MORE_PROMPT = ">> ", ".. "
QUIT_HINT = "[to quit: /quit or Ctrl-D]"


def enable_line_editing() -> None:
    """Line editing and history at the prompt: `input` uses readline once it is imported (it is
    absent on some platforms, which then keep plain input)."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def read_block(read: Callable[[str], str]) -> str:
    """The lines up to a line with only the block mark (or end of input), joined, as typed."""
    lines: list[str] = []
    while True:
        try:
            line = read(MORE_PROMPT)
        except EOFError:
            return "\n".join(lines)
        if line.strip() == BLOCK:
            return "\n".join(lines)
        lines.append(line)


def run_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Carry out `line` if it is a command (True); an unknown /command is refused with the list
    of commands. Anything else is a message (False)."""
    word = line.split()[0] if line else ""
    if line == "/reset":
        session.reset()
        print("[conversation reset]", file=out)
    elif line in THINKING:
        session.enable_thinking = line == "/think"
        print(f"[thinking {'on' if session.enable_thinking else 'off'}]", file=out)
    elif word.startswith("/") and word not in THINKING:
        print(f"[unknown command {word}; to send it as a message, put it in a {BLOCK} block]",
              file=out)  # fmt: skip
        print(HELP, file=out)
    else:
        return False
    return True


def repl(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    hide_thinking: bool = False,
    verbose: bool = False,
) -> None:
    """Read user turns and commands until a quit word or end of input; errors in a turn are
    reported and the conversation goes on, and Ctrl-C at the prompt gives a new one."""
    print(HELP, file=out)
    while True:
        try:
            line = read(PROMPT).strip()
            message = read_block(read) if line == BLOCK else None
        except EOFError:
            print(file=out)  # Ctrl-D: the shell prompt starts on a line of its own
            break
        except KeyboardInterrupt:  # Ctrl-C drops the line or block being typed, as Python's REPL
            print(f"\n{QUIT_HINT}", file=out)
            continue
        if message is None:
            if line in QUIT_WORDS:
                break
            if run_command(session, line, out):
                continue
            message = line
        if not message.strip():
            continue
        try:
            responses = session.send(message)
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


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The chat command's flags (mlx-lm's names)."""
    parser = command_parser("chat", prog, "Chat with a HunYuan model")
    add_common_arguments(parser)
    add_generation_arguments(parser, max_tokens=CHAT_MAX_TOKENS)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: a chat on stdin/stdout."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        group = init_group()  # size 1 unless run by mlx.launch, which gives every rank stdin
        model, tokenizer, settings = prepare(args, group)
        session = ChatSession(model, tokenizer, settings, args.system_prompt, args.think)
        enable_line_editing()
        first = group.rank() == 0
        repl(
            session,
            read=input if first else lambda _: input(),  # the prompt shown once, by rank 0
            out=rank_output(group, sys.stdout),
            hide_thinking=args.hide_thinking,
            verbose=args.verbose and first,
        )

