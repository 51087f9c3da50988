"""Interrupts that leave nothing half-done: SIGTERM and SIGHUP (a closed terminal) handled as
Ctrl-C is, either at once (`signals_as_interrupts`) or at the next safe point (`deferred`); and
`DEBUG_ENV`, which asks every failure report (a command's, a rank's) for its traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

DEBUG_ENV = "HUNYUAN_MLX_DEBUG"  # set to 1 for tracebacks instead of one-line errors
# SIGHUP does not exist on Windows.
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)


def debug_from_env() -> bool:
    """Whether `DEBUG_ENV` asks for tracebacks (set, and not to 0)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP; `exit_status` is the shell's 128 + signal number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def handling(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """`handler` for every signal of SIGNALS within the block (only the main thread may)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Interrupted` as Ctrl-C does (and Ctrl-C too),
    so the clean-up written for Ctrl-C (`except BaseException`, `finally`) runs for them."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    with handling(handler):
        yield


class Deferred:
    """The signal received within a `deferred()` block, if any, for the loop to act on."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now
            raise Interrupted(signum)
        self.signum = signum

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def deferred() -> Iterator[Deferred]:
    """Within the block, Ctrl-C, SIGTERM and SIGHUP only set `signum` on the object yielded,
    which the loop checks between steps; a second one raises `Interrupted` at once."""
    state = Deferred()
    with handling(state.handler):
        yield state
