"""Session fixtures: tiny random checkpoints, built once (builders in helpers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    RELEASE_FILES,
    RELEASE_VOCAB_GENERATE,
    build_torch_model,
    save_checkpoint,
    tokenizer_files,
    vocab_size,
)

from hunyuan_mlx import load


@pytest.fixture(autouse=True)
def fast_path_cache(tmp_path, monkeypatch) -> Path:
    """The fast paths' threshold cache in the test's own folder, never the user's (subprocesses
    inherit it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hunyuan_mlx" / "fast_paths.json"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Any]:
    """(directory, transformers model) for the default tiny config, untied, several shards."""
    model = build_torch_model()
    path = save_checkpoint(model, tmp_path_factory.mktemp("tiny"), max_shard_size="40KB")
    return path, model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The release's tokenizer files, or without them the tiny fixture's (`tokenizer_files`)."""
    return tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random model with the release's tokenizer and generation config (the real
    128,167-token vocabulary where present, else the tiny fixture's)."""
    path = tmp_path_factory.mktemp("tiny_release")
    vocab = vocab_size(tokenizer_dir)
    save_checkpoint(build_torch_model(**RELEASE_VOCAB_GENERATE, vocab_size=vocab), path)
    for name in RELEASE_FILES:
        shutil.copyfile(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def loaded(tiny_release):
    """(model, tokenizer) of `tiny_release`."""
    return load(tiny_release)
