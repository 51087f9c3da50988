"""mlx-lm's own loader opens a checkpoint our converter wrote, through the `model_file` config
mechanism, and builds this project's model: the same logits, and the same greedy text."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import TINY_CONFIG

# The fixture registers under its name, `tiny_release`.
from test_generate import tiny_release_fixture  # noqa: F401

from hunyuan_mlx import HunYuanMoEV1ForCausalLM, convert, load_model
from hunyuan_mlx.cli import GenerationSettings
from hunyuan_mlx.generate import build_prompt, generate
from hunyuan_mlx.loading import load
from hunyuan_mlx.mlx_lm_model import MODEL_FILE

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
