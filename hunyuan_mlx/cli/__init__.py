"""The commands: `hunyuan-mlx <command>` (also `python -m hunyuan_mlx <command>`) dispatches to
`cli/<command>.py`, whose `main(argv, prog)` every entry point calls; `run_main` is the error
handling they share, `options` the flags several of them take."""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from signal import SIGINT
from typing import TextIO

from .. import __version__
from ..interrupts import Interrupted, debug_from_env

# Command -> what it does; `hunyuan_mlx.cli.<command>.main` runs it.
COMMANDS = {
    "convert": "Convert a Hugging Face checkpoint to MLX (optionally quantized)",
    "generate": "Generate one answer",
    "chat": "Chat in the terminal",
    "lora": "Fine-tune with LoRA, DoRA or full fine-tuning",
    "fuse": "Fuse trained adapters into a standalone model",
    "server": "Serve an OpenAI-compatible HTTP API",
    "evaluate": "Perplexity, and divergence from a reference model",
    "tune": "Measure the experts' kernels here and cache the fast paths' thresholds",
}
# What a user's input can cause (a bad path, value, file or flag combination, MLX refusing it).
USER_ERRORS = (OSError, ValueError, RuntimeError)


@contextlib.contextmanager
def run_main(prog: str, debug: bool = False) -> Iterator[None]:
    """Errors a user can cause become `prog: error: message` on stderr and exit status 1, as
    argparse reports a bad flag; Ctrl-C exits with 130, SIGTERM and SIGHUP (when raised as
    `Interrupted`) with 128 + their number. Warnings are one line, `prog: warning: message`.
    `debug` keeps the traceback, and Python's warnings with their source line."""
    debug = debug or debug_from_env()
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = functools.partial(show_warning, prog)
            yield
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        by = f" ({e})" if isinstance(e, Interrupted) and e.signum != SIGINT else ""
        print(f"\n{prog}: error: interrupted{by}", file=sys.stderr)
        raise SystemExit(e.exit_status if isinstance(e, Interrupted) else 128 + SIGINT) from None


def show_warning(
    prog: str,
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning as one line under the command's name, as its errors are (`warnings.showwarning`'s
    signature, `prog` first); where the warning was raised is code, not news to a user."""
    print(f"{prog}: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Run `hunyuan-mlx <command> [flags]`: the command's own `main` with the flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"hunyuan-mlx {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
        print(
            f"usage: hunyuan-mlx <command> [flags]\n       hunyuan-mlx --version\n\n"
            f"commands:\n{lines}\n\nRun `hunyuan-mlx <command> --help` for a command's flags.",
            file=sys.stderr,
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hunyuan-mlx: error: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(0 if argv else 2)
    command = importlib.import_module(f"hunyuan_mlx.cli.{argv[0]}")
    command.main(argv[1:], prog=f"hunyuan-mlx {argv[0]}")
