"""mlx-lm's own tools open a checkpoint our converter wrote, through the `model_file` config
mechanism, and build this project's model: the same logits, and the same greedy text from
`mlx_lm.generate` and from mlx-lm's server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from helpers import TINY_CONFIG
from mlx_lm.generate import main as mlx_lm_generate_main

# The fixture registers under its name, `tiny_release`.
from hunyuan_mlx import HunYuanMoEV1ForCausalLM, convert, load_model
from hunyuan_mlx.cli.generate import main as generate_main
from hunyuan_mlx.generation.settings import GenerationSettings
from hunyuan_mlx.generation.stream import build_prompt, generate
from hunyuan_mlx.loading import load
from hunyuan_mlx.mlx_lm_model import MODEL_FILE

ROOT = Path(__file__).resolve().parents[1]
IDS = mx.array(np.random.default_rng(0).integers(0, TINY_CONFIG["vocab_size"], (2, 24)))


@pytest.mark.parametrize("quantize", [False, True], ids=["float32", "4bit"])
def test_mlx_lm_load_gives_our_logits(tiny_checkpoint, tmp_path, quantize):
    source, _ = tiny_checkpoint
    q = dict(quantize=True, q_bits=4, q_group_size=32) if quantize else {}
    out = tmp_path / "mlx"
    convert(source, out, dtype="float32", **q)
    assert json.loads((out / "config.json").read_text())["model_file"] == MODEL_FILE
    source_text = (out / MODEL_FILE).read_text()
    assert "from hunyuan_mlx import" in source_text and "class " not in source_text

    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.utils.load_model(out)
    theirs, _ = mlx_lm.utils.load_model(out, trust_remote_code=True)
    assert type(theirs) is HunYuanMoEV1ForCausalLM
    ours = load_model(out)
    np.testing.assert_allclose(np.array(theirs(IDS)), np.array(ours(IDS)), atol=1e-4, rtol=0)


def test_mlx_lm_generate_gives_our_text(tiny_release, tmp_path):
    out = tmp_path / "mlx"
    convert(tiny_release, out, dtype="float32")
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    ours, our_tokenizer = load(out)
    # mlx-lm's tokenizer (from the tokenizer.json the converter writes) gives the same ids.
    ids = build_prompt(our_tokenizer, "Tell me about MLX.", enable_thinking=True)
    assert tokenizer.encode(our_tokenizer.decode(ids)) == ids
    settings = GenerationSettings(max_tokens=10)
    text = mlx_lm.generate(model, tokenizer, ids, max_tokens=settings.max_tokens)
    assert text == generate(ours, our_tokenizer, ids, settings)


def test_mlx_lm_generate_command_differs_only_by_the_repetition_penalty(
    tiny_release, tmp_path, capsys, monkeypatch
):
    """`mlx_lm.generate --trust-remote-code` and our `generate`, greedy on a bf16 checkpoint, give
    the same text once the prompt (`--no-think`: mlx-lm's template call turns thinking off), the
    dtype (`--dtype checkpoint`; ours computes in float32 on the CPU) and the repetition penalty
    agree: ours applies the checkpoint's generation_config.json (1.05), mlx-lm's command none."""
    out = tmp_path / "mlx"
    convert(tiny_release, out, dtype="bfloat16")
    assert GenerationSettings.from_checkpoint(out).repetition_penalty == 1.05
    monkeypatch.setattr(
        sys,
        "argv",
        ["mlx_lm.generate", "--model", str(out), "--trust-remote-code", "--prompt", "hello"]
        + ["--max-tokens", "24", "--temp", "0"],
    )
    mlx_lm_generate_main()
    theirs = capsys.readouterr().out.split("==========\n")[1].removesuffix("\n")

    def ours(*flags: str) -> str:
        argv = ["--model", str(out), "--prompt", "hello", "--max-tokens", "24", "--temp", "0"]
        generate_main([*argv, "--no-think", "--dtype", "checkpoint", *flags])
        return capsys.readouterr().out.removesuffix("\n")

    assert ours("--repetition-penalty", "1") == theirs
    assert ours() != theirs  # the checkpoint's penalty of 1.05


def test_mlx_lm_server_serves_our_model_batched(tiny_release, tmp_path):
    """mlx-lm's own server, with --trust-remote-code, answers concurrent requests (which it
    batches) with our model's greedy text."""
    out = tmp_path / "mlx"
    convert(tiny_release, out, dtype="float32")
    ours, tokenizer = load(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(out)]
    command += ["--trust-remote-code", "--port", str(port)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        prompts = ["Hello", "Tell me a long story about the sea and the wind", "1 2 3"]

        def complete(prompt: str) -> str:
            body = {"model": str(out), "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode()
            )
            with urllib.request.urlopen(request) as response:
                return json.loads(response.read())["choices"][0]["text"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(complete, prompts))
    finally:
        process.terminate()
        process.wait(timeout=10)
    settings = GenerationSettings(max_tokens=8)
    expected = [generate(ours, tokenizer, p, settings) for p in prompts]
    # mlx-lm's BPE streaming detokenizer drops a space that starts the first generated token.
    assert texts == [t[1:] if t.startswith(" ") else t for t in expected]
