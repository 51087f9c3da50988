"""Builders the tests share: tiny random HunYuan checkpoints written by transformers, the tiny
configs, and the real release files (skipping where they are absent)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# HUNYUAN_MLX_SHARED points elsewhere (a missing folder runs the suite as a checkout without it).
SHARED = Path(os.environ.get("HUNYUAN_MLX_SHARED", ROOT.parent / "shared" / "hunyuan-a13b"))
TINY_TOKENIZER = ROOT / "tests" / "fixtures" / "tiny-tokenizer"
# Generous: a loaded 2-core machine (several suites at once) starts a server in tens of seconds.
SERVER_STARTUP_SECONDS = 180

# Small enough for a 2-core CPU, large enough that routing and GQA are non-trivial.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    moe_topk=2,
    max_position_embeddings=64,
    # Larger than transformers' 0.02 so that logits and routing scores are far from uniform.
    initializer_range=0.1,
)


# The release's tokenizer and generation files, copied beside tiny models that use the real
# 128,167-token vocabulary.
RELEASE_FILES = ("hy.tiktoken", "tokenizer_config.json", "generation_config.json")
# Tiny models with the release's tokenizer (its `vocab_size` of them): hidden 32 keeps the real
# 128k-row embedding small. For generation: head_dim 32 allows KV-cache quantization.
RELEASE_VOCAB_GENERATE = dict(
    hidden_size=32,
    intermediate_size=16,
    head_dim=32,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
# For fine-tuning: quick to train on the car data.
RELEASE_VOCAB_TRAIN = dict(
    hidden_size=32,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=8,
    moe_topk=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
# For the fast paths: 16 experts top-4 and widths the quantization group size 32 divides.
FAST_PATHS_CONFIG = dict(
    vocab_size=200,
    hidden_size=128,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    moe_topk=4,
    rope_scaling={"type": "dynamic", "alpha": 1000.0},
)


def tokenizer_files(scratch: Path) -> Path:
    """The folder of the release's tokenizer files (`RELEASE_FILES`): the real ones where present,
    else a tiny vocabulary with the release's special tokens and chat format, written into
    `scratch` (tests/fixtures/tiny-tokenizer), so that the paths using them run anywhere."""
    if SHARED.is_dir():
        return SHARED
    return load_module(TINY_TOKENIZER / "make_tokenizer.py").write_tokenizer(scratch)


def vocab_size(path: Path) -> int:
    """The number of ids of the tokenizer in `path`: a model using it needs as many rows."""
    from hunyuan_mlx.tokenizer import HunYuanTokenizer

    return HunYuanTokenizer.from_pretrained(path).vocab_size


def shared_dir() -> Path:
    """The real Hunyuan-A13B reference files; skips the test when they are absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real Hunyuan-A13B files not found at {SHARED}")
    return SHARED


def greedy_steps(model, prompt, steps: int, cache: list | None = None, **kwargs):
    """The first `steps` greedy tokens of mlx-lm's generation loop after `prompt` (an mx.array),
    their log-probabilities stacked, and the KV cache (the model's own kind unless given)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model) if cache is None else cache
    tokens, logprobs = [], []
    loop = generate_step(prompt, model, prompt_cache=cache, **kwargs)
    for (token, lp), _ in zip(loop, range(steps)):
        tokens.append(int(token))
        logprobs.append(lp)
    return tokens, mx.stack(logprobs), cache


def build_torch_model(seed: int = 0, model_class: str = "HunYuanMoEV1ForCausalLM", **overrides):
    """A transformers HunYuan model with random weights, norms included, in float32 eval mode."""
    import torch
    import transformers

    config = transformers.HunYuanMoEV1Config(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


def save_checkpoint(model, path: Path, max_shard_size: str | None = None) -> Path:
    """`save_pretrained` (per-expert tensor names, as the release) into `path`."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def as_mlx_lm_layout(tensors: dict[str, Any]) -> dict[str, Any]:
    """This project's tensors under mlx-lm's names: `switch_mlp`, gate and up stacked apart."""
    import numpy as np

    out = {}
    for name, value in tensors.items():
        if ".experts.gate_up_proj." in name:
            gate, up = np.split(np.array(value), 2, axis=1)
            out[name.replace("experts.gate_up_proj", "switch_mlp.gate_proj")] = gate
            out[name.replace("experts.gate_up_proj", "switch_mlp.up_proj")] = up
        else:
            out[name.replace(".experts.", ".switch_mlp.")] = np.array(value)
    return out


def rewrite_as_release_config(path: Path, **extra: Any) -> None:
    """Rewrite a transformers save's config.json as the original release writes its own:
    model_type "hunyuan", attention_head_dim, rope_theta + rope_scaling (`extra` added)."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(
        model_type="hunyuan",
        attention_head_dim=config.pop("head_dim"),
        rope_theta=rope.pop("rope_theta"),
        rope_scaling={k: v for k, v in rope.items() if k != "rope_type"},
        **extra,
    )
    (path / "config.json").write_text(json.dumps(config))


def load_example(relative: str) -> ModuleType:
    """A script under examples/ as a module (examples are not a package)."""
    return load_module(ROOT / "examples" / relative)


def load_module(path: Path) -> ModuleType:
    """A script outside any package, as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(command: list[str], log: Path) -> Iterator[str]:
    """Run a server `command` (ending in `python -m hunyuan_mlx.server ... --port 0`, perhaps
    under mlx.launch) as a process importing this checkout; yields its base URL once it says it
    serves, and terminates it when closed."""
    for _, url in serve_process(command, log):
        yield url


def serve_process(command: list[str], log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`serve`, yielding the process too (for a test that signals it)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    with open(log, "w") as sink:  # its own process group: mlx.launch passes no signal on
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_STARTUP_SECONDS
        while not (found := re.search(r"on (http://\S+)", log.read_text())):
            assert process.poll() is None, f"server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
            time.sleep(0.1)
        yield process, found.group(1)
    finally:  # SIGTERM to every process of the group, as a terminal's Ctrl-C reaches them all
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def server_command(model: Path, *flags: str) -> list[str]:
    """`python -m hunyuan_mlx.server` on `model` and a free port."""
    server = [sys.executable, "-m", "hunyuan_mlx.server"]
    return [*server, "--model", str(model), "--port", "0", *flags]
