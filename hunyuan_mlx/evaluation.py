"""What quantization cost: perplexity, and divergence from a reference model, on the same tokens.

Data becomes windows `(tokens, offset)` of at most `sequence_length` tokens: each token from
`offset` on (never 0: the first token has no context) is scored, predicted from the window's tokens
before it. A model's pass runs the windows in fixed batches, the head over the scored positions
only, in chunks, so neither the (batch, length, vocab) logits nor anything per window outlives its
batch; what a pass keeps is a few numbers per scored token (`Scores`).

Against a reference the two models are never resident together: the reference runs first over all
windows, and what its next-token distributions need is kept: its final hidden states at the scored
positions, written to a temporary file (`TMPDIR`), and its head (the model stripped of its decoder
layers). While the model runs, the reference's log-probabilities are recomputed from them chunk by
chunk, bit for bit as in its own pass, so the KL divergence and top-1 agreement are exact. A token
costs hidden_size values on disk (8 KB for Hunyuan-A13B in bf16, 16 MB a 2048-token window) where
its full log-probabilities would cost vocab_size (0.5 MB in float32, 1 GB a window); the head
left in memory is the embedding (tied in the release), 0.56 GB at 8 bits, 1.05 GB in bf16.
"""

from __future__ import annotations

import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import TextDataset
from tqdm import tqdm

from .tuner.data import load_examples

# (tokens, offset): the tokens from offset on are scored (from 1 on in a window, from 0 in an
# example read from data: a window's first token has no context).
Window = tuple[list[int], int]

DEFAULT_SEQUENCE_LENGTH = 2048
# 4096 tokens a forward pass, as mlx_lm.perplexity's 8 x 512. Activations grow with them: a
# 4096-token prefill of 4-bit Hunyuan-A13B peaked 5.1 GB over its 45.25 GB of weights
# (BENCHMARKS.md, Generation: 50.32 GB).
DEFAULT_BATCH_SIZE = 2
DEFAULT_NUM_SAMPLES = 256  # windows; -1 for all
DEFAULT_SEED = 123  # mlx_lm.perplexity's
# Scored positions per chunk of the head: bounds its float32 (chunk, vocab) temporaries,
# about 0.13 GB each at Hunyuan-A13B's vocabulary (a handful live at once).
HEAD_CHUNK = 256
# Files read as one plain-text document; any other file is read as JSON lines.
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
# What a directory means: the held-out split of a `hunyuan_mlx.lora` data directory.
DATA_DIR_FILES = ("test.jsonl", "valid.jsonl")


def data_file(path: str | Path) -> Path:
    """The file that `--data` names: itself, or a directory's test.jsonl (else valid.jsonl)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data {path} does not exist")
    if not path.is_dir():
        return path
    for name in DATA_DIR_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"Data directory {path} has no {' or '.join(DATA_DIR_FILES)}")


def read_data(path: str | Path, tokenizer: Any) -> list[Window]:
    """`(tokens, offset)` examples of a .txt or .md file (one document), a JSONL file (text, chat
    or prompt/completion records, the prompt masked) or a directory's test.jsonl / valid.jsonl."""
    path = data_file(path)
    if path.suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8")
        # As a JSONL text record: mlx-lm's TextDataset, which ends the document with EOS.
        return [TextDataset([], tokenizer).process({"text": text})] if text else []
    try:
        # No truncation here: make_windows cuts long examples into several windows instead.
        return load_examples(path, tokenizer, max_seq_length=sys.maxsize)
    except ValueError as e:
        if path.suffix == JSONL_SUFFIX:
            raise
        raise ValueError(
            f"{e} (files other than {' and '.join(TEXT_SUFFIXES)} are read as JSON lines)"
        ) from None


def make_windows(examples: list[Window], sequence_length: int) -> list[Window]:
    """Cut each example into consecutive windows of at most `sequence_length` tokens, keeping
    those with a scored token; a window's first token is context only."""
    if sequence_length < 2:
        raise ValueError(f"sequence length must be at least 2, got {sequence_length}")
    windows = []
    for tokens, offset in examples:
        for start in range(0, len(tokens), sequence_length):
            window = tokens[start : start + sequence_length]
            first = max(offset - start, 1)
            if first < len(window):
                windows.append((window, first))
    return windows


def sample_windows(windows: list[Window], num_samples: int, seed: int) -> list[Window]:
    """`num_samples` windows drawn at random (in their original order), or all when -1 or more."""
    if num_samples == 0 or num_samples < -1:
        raise ValueError(f"number of samples must be positive or -1 (all), got {num_samples}")
    if num_samples == -1 or num_samples >= len(windows):
        return windows
    chosen = np.random.default_rng(seed).choice(len(windows), num_samples, replace=False)
    return [windows[i] for i in sorted(chosen)]


def check_fits(config: Any, sequence_length: int, name: str) -> None:
    """Refuse windows longer than the model's context (`max_position_embeddings`)."""
    if sequence_length > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {sequence_length} is beyond the context of {name} "
            f"(max_position_embeddings {config.max_position_embeddings})"
        )


def check_tokens(windows: list[Window], vocab_size: int, name: str) -> None:
    """Refuse token ids the model has no embedding for (data tokenized for another model)."""
    highest = max(max(tokens) for tokens, _ in windows)
    if highest >= vocab_size:
        raise ValueError(
            f"token id {highest} is outside the vocabulary of {name} ({vocab_size} ids): "
            "the data's tokenizer does not belong to this model"
        )


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch of no windows."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")


def scored_tokens(windows: list[Window]) -> int:
    """How many tokens a pass over `windows` scores (each window's from its offset on)."""
    return sum(len(tokens) - offset for tokens, offset in windows)


def check_same_vocabulary(vocab_size: int, reference_vocab_size: int) -> None:
    """Refuse to compare next-token distributions over different vocabularies."""
    if vocab_size != reference_vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the model has {vocab_size} ids, "
            f"the reference {reference_vocab_size}"
        )


def batches(
    windows: list[Window], batch_size: int
) -> Iterator[tuple[mx.array, np.ndarray, np.ndarray]]:
    """Per batch (longest windows first, so the peak memory shows at once): the model's input,
    right-padded (B, T - 1); the flat input positions whose next token is scored; those tokens.

    Right padding needs no mask: attention is causal, so padding only follows the real tokens.
    """
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    for s in range(0, len(order), batch_size):
        chunk = [windows[i] for i in order[s : s + batch_size]]
        width = max(len(tokens) for tokens, _ in chunk)
        ids = np.zeros((len(chunk), width), dtype=np.int32)
        positions, targets = [], []
        for row, (tokens, offset) in enumerate(chunk):
            ids[row, : len(tokens)] = tokens
            positions.append(row * (width - 1) + np.arange(offset - 1, len(tokens) - 1))
            targets.append(tokens[offset:])
        yield mx.array(ids[:, :-1]), np.concatenate(positions), np.concatenate(targets)


@dataclass
class Scores:
    """What one model's pass keeps, per scored token in batch order, and how long it took."""

    losses: np.ndarray  # float32 negative log-likelihood of the scored token
    top1: np.ndarray  # the most likely token
    tokens_processed: int  # window tokens through the model, padding not counted
    seconds: float
    vocab_size: int
    kl: np.ndarray | None = None  # with a reference: KL(reference || this model)


class Reference:
    """A reference's pass over some windows, and what recomputes its next-token distributions
    there once its decoder layers are gone: its final hidden states at the scored positions (in a
    temporary file, in pass order) and its head."""

    def __init__(self, model: Any, windows: list[Window], batch_size: int) -> None:
        self.hidden_file: IO[bytes] = tempfile.TemporaryFile(prefix="hunyuan_mlx_reference.")
        self.hidden_size: int = model.config.hidden_size
        self.dtype: mx.Dtype = mx.float32  # the hidden states' own, set by `write`
        self.scores = score(model, windows, batch_size, save_hidden=self, name="reference")
        self._rows = len(self.scores.losses)
        # Only what lm_head_logits reads stays: the tied embedding or the lm_head (and the
        # embedding of an untied model, unused here).
        model.model.layers = []
        self.head = model

    def write(self, hidden: mx.array) -> None:
        """Append rows of final hidden states (the reference's pass)."""
        self.dtype = hidden.dtype
        self.hidden_file.write(np.array(hidden.view(mx.uint8)).tobytes())

    def logprobs(self, start: int, rows: int) -> mx.array:
        """Float32 next-token log-probabilities of scored tokens start .. start + rows - 1."""
        row_bytes = self.hidden_size * self.dtype.size
        self.hidden_file.seek(start * row_bytes)
        data = np.frombuffer(self.hidden_file.read(rows * row_bytes), dtype=np.uint8)
        hidden = mx.array(data).view(self.dtype).reshape(rows, self.hidden_size)
        return log_softmax(self.head.lm_head_logits(hidden))

    @property
    def disk_bytes(self) -> int:
        """Size of the hidden-state file."""
        return self._rows * self.hidden_size * self.dtype.size

    def matches(self, windows: list[Window]) -> bool:
        """Whether these are the windows the reference scored (as many scored tokens)."""
        return self._rows == scored_tokens(windows)


def log_softmax(logits: mx.array) -> mx.array:
    """Float32 log-probabilities of logits of any dtype."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def score(
    model: Any,
    windows: list[Window],
    batch_size: int = DEFAULT_BATCH_SIZE,
    reference: Reference | None = None,
    save_hidden: Reference | None = None,
    name: str = "model",
) -> Scores:
    """One pass of `model` over `windows`: per-token losses and top-1, and the KL divergence from
    a `reference` that scored the same windows; `save_hidden` receives the final hidden states."""
    config = model.config
    vocab = config.vocab_size
    longest = max(len(tokens) for tokens, _ in windows)
    check_fits(config, longest, f"the {name}")
    check_tokens(windows, vocab, f"the {name}")
    if reference is not None:
        check_same_vocabulary(vocab, reference.scores.vocab_size)
        if not reference.matches(windows):
            raise ValueError("the reference scored other windows")
    kept: dict[str, list[np.ndarray]] = {}
    done = 0  # scored tokens so far: the row into the reference's hidden states
    processed = sum(len(tokens) for tokens, _ in windows)
    start = time.perf_counter()
    # Shown also when stderr is not a terminal (a log, a pipe): a pass can take hours.
    with tqdm(
        total=scored_tokens(windows), desc=f"{name.capitalize()}: scored", unit="tok",
        unit_scale=True, disable=False,
    ) as bar:  # fmt: skip
        for inputs, positions, targets in batches(windows, batch_size):
            hidden = model.model(inputs)
            hidden = hidden.reshape(-1, hidden.shape[-1])[mx.array(positions)]
            mx.eval(hidden)
            for s in range(0, len(targets), HEAD_CHUNK):
                chunk = hidden[s : s + HEAD_CHUNK]
                logp = log_softmax(model.lm_head_logits(chunk))
                target = mx.array(targets[s : s + HEAD_CHUNK])[:, None]
                out = {
                    "losses": -mx.take_along_axis(logp, target, axis=-1)[:, 0],
                    "top1": mx.argmax(logp, axis=-1),
                }
                if reference is not None:
                    ref = reference.logprobs(done + s, chunk.shape[0])
                    out["kl"] = (mx.exp(ref) * (ref - logp)).sum(-1)
                if save_hidden is not None:
                    save_hidden.write(chunk)
                mx.eval(out)
                for key, value in out.items():
                    kept.setdefault(key, []).append(np.array(value))
            done += len(targets)
            bar.update(len(targets))
    seconds = time.perf_counter() - start
    arrays = {key: np.concatenate(values) for key, values in kept.items()}
    return Scores(tokens_processed=processed, seconds=seconds, vocab_size=vocab, **arrays)


@dataclass(frozen=True)
class Perplexity:
    """exp(mean token loss), its standard error (delta method), and the pass's size and speed."""

    perplexity: float
    perplexity_se: float | None  # None with a single token
    tokens: int
    tokens_per_sec: float


def perplexity(scores: Scores) -> Perplexity:
    """Perplexity of one pass, as mlx_lm.perplexity computes it, from per-token losses."""
    losses = scores.losses.astype(np.float64)
    value = math.exp(losses.mean())
    n = len(losses)
    se = value * losses.std(ddof=1) / math.sqrt(n) if n > 1 else None
    return Perplexity(value, se, n, scores.tokens_processed / scores.seconds)


@dataclass(frozen=True)
class Divergence:
    """How far the model's next-token distributions are from the reference's, token by token."""

    kl_mean: float
    kl_p99: float
    top1_agreement: float
    # exp(mean(loss - reference loss)) and its standard error: paired, so far tighter than
    # the two perplexities' errors.
    perplexity_ratio: float
    perplexity_ratio_se: float | None


def divergence(scores: Scores, reference: Scores) -> Divergence:
    """Summary of a pass scored against a reference pass over the same windows."""
    if scores.kl is None:
        raise ValueError("the model's pass was not scored against a reference")
    diff = scores.losses.astype(np.float64) - reference.losses
    ratio = math.exp(diff.mean())
    n = len(diff)
    return Divergence(
        kl_mean=float(scores.kl.astype(np.float64).mean()),
        kl_p99=float(np.percentile(scores.kl, 99)),
        top1_agreement=float((scores.top1 == reference.top1).mean()),
        perplexity_ratio=ratio,
        perplexity_ratio_se=ratio * diff.std(ddof=1) / math.sqrt(n) if n > 1 else None,
    )


@dataclass(frozen=True)
class Evaluation:
    """The model's perplexity and, with a reference, the reference's and the divergence."""

    model: Perplexity
    reference: Perplexity | None = None
    divergence: Divergence | None = None
    reference_disk_bytes: int = 0  # the reference's hidden states in the temporary file

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready fields: the model's, then `reference_`-prefixed ones, then the KL's."""
        out = dict(vars(self.model))
        if self.reference is not None:
            out |= {f"reference_{k}": v for k, v in vars(self.reference).items() if k != "tokens"}
        if self.divergence is not None:
            out |= vars(self.divergence)
            out["reference_disk_bytes"] = self.reference_disk_bytes
        return out


def evaluate(
    load_model: Callable[[], Any],
    windows: list[Window],
    load_reference: Callable[[], Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Evaluation:
    """Score the model from `load_model()` on `windows`; with `load_reference`, run the reference
    first, keep only its head and hidden states, then the model, and compare them token by token.
    Each loader is called once."""
    if not windows:
        raise ValueError("no windows to evaluate")
    check_batch_size(batch_size)
    reference = None
    if load_reference is not None:
        reference = Reference(load_reference(), windows, batch_size)
        # Free the reference's layers before the model loads (gc: any cycle in the modules).
        gc.collect()
        mx.clear_cache()
    model = load_model()
    scores = score(model, windows, batch_size, reference=reference)
    if reference is None:
        return Evaluation(perplexity(scores))
    return Evaluation(
        perplexity(scores),
        perplexity(reference.scores),
        divergence(scores, reference.scores),
        reference.disk_bytes,
    )
