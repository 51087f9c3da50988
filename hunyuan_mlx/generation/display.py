"""Showing streamed text: the model's `<think>` reasoning dimmed or hidden, and the stats."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from mlx_lm.generate import GenerationResponse

THINK_START, THINK_END = "<think>", "</think>"
DIM, RESET = "\033[2m", "\033[0m"


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
        keep = partial_suffix(self._pending, (THINK_END if self.thinking else THINK_START,))
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


def partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper start of one of `tags`: what a
    stream must hold back until the next text says whether a tag begins there."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        end = text[-n:]
        if any(len(tag) > n and tag.startswith(end) for tag in tags):
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
