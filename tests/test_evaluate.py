"""Evaluation: perplexity against transformers, KL against a reference, chat masking, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, build_torch_model, save_checkpoint, shared_dir
from mlx.utils import tree_flatten

from hunyuan_mlx import evaluation
from hunyuan_mlx.cli.evaluate import format_table, main
from hunyuan_mlx.converter import convert
from hunyuan_mlx.evaluation import (
    Reference,
    data_file,
    evaluate,
    make_windows,
    read_data,
    sample_windows,
    score,
)
from hunyuan_mlx.files import read_jsonl
from hunyuan_mlx.loading import load_model
from hunyuan_mlx.tokenizer import HunYuanTokenizer

RTOL = 1e-4
VOCAB = TINY_CONFIG["vocab_size"]
# Windows of several lengths (padding in a batch), some with a masked prefix.
RNG = np.random.default_rng(0)
WINDOWS = [
    (RNG.integers(0, VOCAB, length).tolist(), offset)
    for length, offset in [(40, 1), (33, 1), (40, 12), (25, 1), (17, 5), (40, 1), (9, 1)]
]
TOKENIZER_FILES = ("hy.tiktoken", "tokenizer_config.json")


def loader(path: Path):
    return lambda: load_model(path)


def torch_logprobs(torch_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = torch_model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, -1).numpy()


def torch_losses(torch_model, windows) -> np.ndarray:
    """transformers' next-token losses of the scored tokens, window by window."""
    out = []
    for tokens, offset in windows:
        logp = torch_logprobs(torch_model, tokens)
        out.append(-logp[np.arange(offset - 1, len(tokens) - 1), tokens[offset:]])
    return np.concatenate(out).astype(np.float64)


def full_logprobs(path: Path, windows) -> np.ndarray:
    """Log-probabilities (float64) at the scored positions, window by window (no batching), from
    the model's full logits."""
    model = load_model(path)
    out = []
    for tokens, offset in windows:
        x = np.array(model(mx.array([tokens]))[0], dtype=np.float64)[offset - 1 : len(tokens) - 1]
        out.append(x - np.logaddexp.reduce(x, axis=-1, keepdims=True))
    return np.concatenate(out)


def full_kl(reference: Path, model: Path, windows) -> np.ndarray:
    """KL(reference || model) over the whole vocabulary, token by token."""
    p, q = full_logprobs(reference, windows), full_logprobs(model, windows)
    return (np.exp(p) * (p - q)).sum(-1)


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory) -> dict[int, Path]:
    """The tiny checkpoint converted at 8, 4 and 3 bits (float32 scales)."""
    root = tmp_path_factory.mktemp("quantized")
    for bits in (8, 4, 3):
        convert(
            tiny_checkpoint[0],
            root / f"q{bits}",
            quantize=True,
            q_bits=bits,
            q_group_size=32,
            dtype="float32",
        )
    return {bits: root / f"q{bits}" for bits in (8, 4, 3)}


# --- windows -----------------------------------------------------------------------------------


def test_windows_cut_long_examples_and_keep_the_mask():
    tokens = list(range(10))
    assert make_windows([(tokens, 0)], 4) == [
        ([0, 1, 2, 3], 1),
        ([4, 5, 6, 7], 1),
        ([8, 9], 1),
    ]
    # The masked prefix reaches into the second window; the first has nothing left to score.
    assert make_windows([(tokens, 6)], 4) == [([4, 5, 6, 7], 2), ([8, 9], 1)]
    assert make_windows([([5], 0)], 4) == []


def test_sample_windows_is_a_seeded_subset_in_order():
    windows = [([i, i], 1) for i in range(20)]
    picked = sample_windows(windows, 5, seed=3)
    assert picked == sample_windows(windows, 5, seed=3) != sample_windows(windows, 5, seed=4)
    assert len(picked) == 5 and picked == sorted(picked) and all(w in windows for w in picked)
    assert sample_windows(windows, -1, 0) == sample_windows(windows, 50, 0) == windows


# --- perplexity and divergence ----------------------------------------------------------------


def test_perplexity_is_exp_of_transformers_mean_loss(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    expected = torch_losses(torch_model, WINDOWS)
    result = evaluate(loader(path), WINDOWS, batch_size=3).model
    assert result.tokens == len(expected) == sum(len(t) - o for t, o in WINDOWS)
    assert result.perplexity == pytest.approx(math.exp(expected.mean()), rel=RTOL)
    se = math.exp(expected.mean()) * expected.std(ddof=1) / math.sqrt(len(expected))
    assert result.perplexity_se == pytest.approx(se, rel=RTOL)
    assert result.tokens_per_sec > 0


def test_a_model_against_itself(tiny_checkpoint):
    path = tiny_checkpoint[0]
    result = evaluate(loader(path), WINDOWS, loader(path), batch_size=3)
    assert result.divergence.kl_mean == 0 and result.divergence.kl_p99 == 0
    assert result.divergence.top1_agreement == 1
    assert result.divergence.perplexity_ratio == 1
    assert result.reference.perplexity == result.model.perplexity


def test_kl_grows_as_bits_fall(tiny_checkpoint, quantized):
    reference = tiny_checkpoint[0]
    kl = {}
    for bits, path in quantized.items():
        result = evaluate(loader(path), WINDOWS, loader(reference), batch_size=4)
        kl[bits] = result.divergence.kl_mean
        assert result.divergence.kl_mean == pytest.approx(
            full_kl(reference, path, WINDOWS).mean(), rel=RTOL
        )
        assert result.divergence.top1_agreement < 1
    assert 0 < kl[8] < kl[4] < kl[3]


def test_kl_is_exact_token_by_token(tiny_checkpoint, quantized, monkeypatch):
    reference_path, model_path = tiny_checkpoint[0], quantized[4]
    # Several head chunks per batch, one of them partial.
    monkeypatch.setattr(evaluation, "HEAD_CHUNK", 5)
    # Windows of one length keep their order in the batches, so tokens line up with full_kl's.
    windows = [(tokens[:9], 1) for tokens, _ in WINDOWS]
    reference = Reference(load_model(reference_path), windows, batch_size=3)
    # Only the head is left of the reference: its decoder layers are gone.
    assert not any(".layers." in name for name, _ in tree_flatten(reference.head.parameters()))
    hidden = TINY_CONFIG["hidden_size"]
    assert reference.disk_bytes == 4 * hidden * len(windows) * 8  # float32, 8 scored a window
    kl = score(load_model(model_path), windows, batch_size=3, reference=reference).kl
    np.testing.assert_allclose(kl, full_kl(reference_path, model_path, windows), rtol=RTOL)


# --- data -------------------------------------------------------------------------------------


def test_data_directory_means_its_held_out_split(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="has no test.jsonl or valid.jsonl"):
        data_file(tmp_path)
    (tmp_path / "valid.jsonl").write_text("")
    assert data_file(tmp_path) == tmp_path / "valid.jsonl"
    (tmp_path / "test.jsonl").write_text("")
    assert data_file(tmp_path) == tmp_path / "test.jsonl"


def test_text_file_is_one_document_ending_with_eos(tmp_path):
    tokenizer = HunYuanTokenizer.from_pretrained(shared_dir())
    (tmp_path / "doc.txt").write_text("Hello world. 你好，世界。", encoding="utf-8")
    [(tokens, offset)] = read_data(tmp_path / "doc.txt", tokenizer)
    assert offset == 0
    assert tokens == tokenizer.encode("Hello world. 你好，世界。") + [tokenizer.eos_token_id]
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "Hello world. 你好，世界。"}) + "\n")
    assert read_data(tmp_path, tokenizer) == [(tokens, 0)]


def test_chat_data_scores_only_the_answers(tmp_path):
    shared = shared_dir()
    tokenizer = HunYuanTokenizer.from_pretrained(shared)
    records = [r for _, r in read_jsonl(shared / "example_data.jsonl")]
    windows = make_windows(read_data(shared / "example_data.jsonl", tokenizer), 4096)
    assert len(windows) == len(records)
    for (tokens, offset), record in zip(windows, records):
        assert tokenizer.decode(tokens[offset:]) == record["messages"][-1]["content"] + "<|eos|>"
        assert tokenizer.decode(tokens[:offset]).startswith("<|startoftext|>")

    # Through the command, with a tiny model of the real vocabulary: the tokens scored and their
    # losses are transformers' at the answer positions only.
    torch_model = build_torch_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    model = save_checkpoint(torch_model, tmp_path / "model")
    for name in TOKENIZER_FILES:
        shutil.copy(shared / name, model / name)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:2]))
    chat = make_windows(read_data(data, tokenizer), 512)
    expected = torch_losses(torch_model, chat)
    assert len(expected) < sum(len(t) for t, _ in chat) - len(chat)
    record = run_cli(
        ["--model", str(model), "--reference", str(model), "--data", str(data)]
        + ["--sequence-length", "512"]
    )
    assert record["tokens"] == len(expected)
    assert record["perplexity"] == pytest.approx(math.exp(expected.mean()), rel=RTOL)
    assert record["reference_perplexity"] == record["perplexity"]
    assert record["kl_mean"] == 0 and record["top1_agreement"] == 1
    # The reference's final hidden states, float32, one row per scored token.
    assert record["reference_disk_bytes"] == 4 * torch_model.config.hidden_size * len(expected)
    table = format_table(record)
    assert f"{record['perplexity']:.4f} ± {record['perplexity_se']:.4f}" in table
    assert "top-1 agreement: 1.0000" in table


# --- command line -----------------------------------------------------------------------------


def run_cli(argv: list[str]) -> dict:
    """The command's --json record."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([*argv, "--json"])
    return json.loads(out.getvalue())


def cli_error(capsys, argv: list[str]) -> str:
    """The command's one-line error, after checking it exits with status 1 and prints nothing."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m hunyuan_mlx.evaluate: error: ")
    return lines[0]


@pytest.fixture
def with_tokenizer(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint with the real tokenizer beside it (ids beyond its 96: see the test)."""
    shared = shared_dir()
    path = shutil.copytree(tiny_checkpoint[0], tmp_path / "model")
    for name in TOKENIZER_FILES:
        shutil.copy(shared / name, path / name)
    return path


def test_cli_errors(capsys, tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint[0])
    other = save_checkpoint(build_torch_model(vocab_size=100), tmp_path / "other")
    data = tmp_path / "data.txt"
    data.write_text("some text")
    capsys.readouterr()
    fits = ["--sequence-length", "64"]
    missing = cli_error(capsys, ["--model", model, "--data", str(tmp_path / "nope.jsonl"), *fits])
    assert "nope.jsonl does not exist" in missing
    no_model = cli_error(capsys, ["--model", str(tmp_path / "none"), "--data", str(data), *fits])
    assert "none does not exist" in no_model
    too_long = cli_error(capsys, ["--model", model, "--data", str(data), "--sequence-length", "65"])
    assert "sequence length 65 is beyond the context of the model" in too_long
    mismatch = cli_error(
        capsys, ["--model", model, "--reference", str(other), "--data", str(data), *fits]
    )
    assert "vocabulary mismatch: the model has 96 ids, the reference 100" in mismatch


def test_cli_errors_on_data(capsys, with_tokenizer, tmp_path):
    model = str(with_tokenizer)
    for name, text in [("empty.txt", ""), ("empty.jsonl", "\n")]:
        (tmp_path / name).write_text(text)
        error = cli_error(
            capsys, ["--model", model, "--data", str(tmp_path / name), "--sequence-length", "64"]
        )
        assert "has no tokens to score (an empty data set)" in error
    (tmp_path / "doc.txt").write_text("Hello world")
    error = cli_error(
        capsys, ["--model", model, "--data", str(tmp_path / "doc.txt"), "--sequence-length", "64"]
    )
    assert "outside the vocabulary of the model (96 ids)" in error
    error = cli_error(
        capsys,
        ["--model", model, "--data", str(tmp_path / "doc.txt"), "--sequence-length", "64"]
        + ["--batch-size", "0"],
    )
    assert "batch size must be at least 1, got 0" in error


def test_markdown_is_text_and_the_command_says_what_it_scores(tmp_path, capsys):
    """A .md file is one document, as a .txt; the command's first line on stderr says how many
    tokens it will score, then a progress bar (also off a terminal) counts them, with tokens/s and
    the time left."""
    shared = shared_dir()
    tokenizer = HunYuanTokenizer.from_pretrained(shared)
    text = "# Notes\n\nSome *Markdown* text.\n"
    (tmp_path / "notes.md").write_text(text, encoding="utf-8")
    [(tokens, offset)] = read_data(tmp_path / "notes.md", tokenizer)
    assert (tokens, offset) == (tokenizer.encode(text) + [tokenizer.eos_token_id], 0)

    model = save_checkpoint(build_torch_model(vocab_size=tokenizer.vocab_size), tmp_path / "model")
    for name in TOKENIZER_FILES:
        shutil.copy(shared / name, model / name)
    capsys.readouterr()
    data = str(tmp_path / "notes.md")
    record = run_cli(["--model", str(model), "--data", data, "--sequence-length", "64"])
    scored = len(tokens) - 1
    assert record["tokens"] == scored
    err = capsys.readouterr().err
    assert err.startswith(
        f"Scoring {scored} tokens (1 window of at most 64 tokens from {data}) with the model\n"
    )
    last = err.rsplit("\r", 1)[-1]
    assert re.fullmatch(
        rf"Model: scored: 100%\|\S+\| {scored}\.00/{scored}\.00 \[00:00<00:00, .*tok/s\]\n", last
    )


def test_other_files_are_read_as_json_lines(capsys, with_tokenizer, tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    error = cli_error(
        capsys,
        ["--model", str(with_tokenizer), "--data", str(tmp_path / "notes.csv")]
        + ["--sequence-length", "64"],
    )
    assert "notes.csv, line 1: not valid JSON" in error
    assert error.endswith("(files other than .txt and .md are read as JSON lines)")
