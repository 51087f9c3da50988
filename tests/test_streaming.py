"""Routed experts streamed from disk under a memory budget: the same tokens and logits as the
resident model (prefill, cached decode, a prompt cache, the server), the cache's reads, the
budget's checks, and a shard lost mid-run."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from helpers import (
    RELEASE_FILES,
    RELEASE_VOCAB_GENERATE,
    build_torch_model,
    save_checkpoint,
    serve,
    server_command,
    vocab_size,
)
from mlx.utils import tree_flatten

from hunyuan_mlx import streaming
from hunyuan_mlx.cli.generate import main as generate_main
from hunyuan_mlx.converter import convert
from hunyuan_mlx.generation.settings import GenerationSettings
from hunyuan_mlx.generation.stream import stream_generate
from hunyuan_mlx.loading import load, load_model
from hunyuan_mlx.models.experts import GatheredGLU
from hunyuan_mlx.models.quantization import is_routed_expert
from hunyuan_mlx.streaming import READ_AHEAD, ExpertReadError, StreamedGLU, expert_store

# More experts than the shared fixtures' 8, so that a budget can hold one layer's but not all.
STREAM_CONFIG = {**RELEASE_VOCAB_GENERATE, "intermediate_size": 32, "num_experts": 16,
                 "moe_topk": 2, "num_hidden_layers": 3}
CACHED_EXPERTS = 20  # of 48: the budget's cache, beyond the reads in flight
PROMPT = [5, 17, 3, 99, 42, 7, 23, 61, 11, 2, 8, 30]


@pytest.fixture(scope="module")
def stream_release(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random float32 model with 16 experts a layer and the release's tokenizer files."""
    path = tmp_path_factory.mktemp("stream_release")
    vocab = vocab_size(tokenizer_dir)
    save_checkpoint(
        build_torch_model(**STREAM_CONFIG, vocab_size=vocab), path
    )
    for name in RELEASE_FILES:
        shutil.copyfile(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def stream_4bit(stream_release, tmp_path_factory) -> Path:
    """`stream_release` converted to 4 bits (group 32) by this project's converter."""
    path = tmp_path_factory.mktemp("stream_4bit") / "model"
    convert(stream_release, path, quantize=True, q_bits=4, q_group_size=32)
    return path


def budget_for(path: Path, cached_experts: int = CACHED_EXPERTS) -> int:
    """A budget that keeps the non-expert weights, the reads in flight and `cached_experts`."""
    model = load_model(path, lazy=True, memory_budget=None)
    params = dict(tree_flatten(model.parameters()))
    experts = sum(p.nbytes for n, p in params.items() if is_routed_expert(n))
    resident = sum(p.nbytes for p in params.values()) - experts
    config = model.config
    expert = experts // (config.num_hidden_layers * config.num_experts)
    in_flight = READ_AHEAD + 1 + config.layer_moe_topk(0) + 1
    return resident + (in_flight + cached_experts) * expert


def streamed(path: Path, cached_experts: int = CACHED_EXPERTS):
    model = load_model(path, memory_budget=budget_for(path, cached_experts))
    assert all(isinstance(layer.mlp.experts, StreamedGLU) for layer in model.layers)
    return model


def test_weights_within_the_budget_load_as_ever(stream_release):
    model = load_model(stream_release, memory_budget="10GB")
    assert all(isinstance(layer.mlp.experts, GatheredGLU) for layer in model.layers)
    assert expert_store(model) is None


def test_float32_prefill_decode_and_prompt_cache_match_the_resident_model(stream_release):
    resident, model = load_model(stream_release), streamed(stream_release)
    store = expert_store(model)
    prompt = mx.array([PROMPT])
    # Prefill: one chunk, each layer's experts read once.
    a, b = resident(prompt), model(prompt)
    assert mx.abs(a - b).max().item() <= 1e-5
    assert store.stats["reads"] + store.stats["hits"] == store.stats["needed"]
    assert store.stats["reads"] > 0
    # Cached decode, and a prompt cache holding a prefix that a longer chunk continues.
    caches = resident.make_cache(), model.make_cache()
    for m, cache in zip((resident, model), caches):
        m(prompt[:, :5], cache=cache)
    steps = [prompt[:, 5:], mx.array([[4]]), mx.array([[9]]), mx.array([[4]])]
    for step in steps:
        a, b = (m(step, cache=c) for m, c in zip((resident, model), caches))
        assert mx.abs(a - b).max().item() <= 1e-5
    # What the last step used is still cached: the next token does not read it again.
    used = {key for key, when in store.last_use.items() if when > store.clock - 3}
    assert used and used <= store.cache.keys()
    assert store.cached_bytes <= store.capacity


def test_4bit_greedy_generation_matches_the_resident_model(stream_4bit):
    resident, tokenizer = load(stream_4bit)
    model, _ = load(stream_4bit, memory_budget=budget_for(stream_4bit))
    settings = GenerationSettings(max_tokens=16)
    runs = [[r.token for r in stream_generate(m, tokenizer, PROMPT, settings)]
            for m in (resident, model)]
    assert runs[0] == runs[1] and len(runs[0]) == 16
    stats = expert_store(model).stats
    assert stats["guessed"] > 0 and 0 <= stats["guessed_right"] <= stats["guessed"]


def test_without_a_budget_a_model_over_memory_is_refused_naming_the_flag(
    stream_release, monkeypatch, capsys
):
    budget = str(budget_for(stream_release))
    monkeypatch.setattr(streaming, "machine_memory", lambda: 10**6)
    with pytest.raises(ValueError, match="--memory-budget"):
        load_model(stream_release)
    with pytest.raises(SystemExit):
        generate_main(["--model", str(stream_release), "-p", "hi", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than this machine's 1.00 MB" in err
    assert "--memory-budget" in err
    # With the flag, the same model streams.
    generate_main(["--model", str(stream_release), "-p", "hi", "--max-tokens", "2",
                   "--memory-budget", budget])


def test_too_small_a_budget_names_the_least_that_works(stream_release, capsys):
    with pytest.raises(ValueError, match="too small .* give at least"):
        load_model(stream_release, memory_budget=budget_for(stream_release, 0) // 2)
    with pytest.raises(SystemExit):
        generate_main(["--model", str(stream_release), "--memory-budget", "8XB"])
    assert "Cannot read size '8XB'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_shard_lost_mid_run_is_one_error_naming_it(stream_release, tmp_path, damage):
    path = tmp_path / "model"
    shutil.copytree(stream_release, path)
    model = streamed(path)
    model(mx.array([PROMPT[:3]]))
    shard = sorted(path.glob("*.safetensors"))[-1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    expert_store(model).cache.clear()
    expert_store(model).cached_bytes = 0
    with pytest.raises(ExpertReadError, match=re.escape(str(shard))) as error:
        model(mx.array([PROMPT]))
    assert damage in str(error.value)


def two_turns(client: openai.OpenAI, model: str, text: str) -> str:
    """A greedy reply and the next turn's, which continues from the server's prompt cache."""
    messages = [{"role": "user", "content": text}]
    replies = []
    for _ in range(2):
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=8
        ).choices[0].message.content
        replies.append(reply)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and?"}]
    return "|".join(replies)


def test_the_server_under_a_budget_serves_concurrent_clients_the_resident_replies(
    stream_release, tmp_path
):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(4)]
    budget = str(budget_for(stream_release))
    model = str(stream_release)
    runs = []
    for flags, workers in (([], 1), (["--memory-budget", budget], len(questions))):
        for url in serve(server_command(stream_release, *flags), tmp_path / f"{workers}.log"):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            with ThreadPoolExecutor(workers) as pool:
                runs.append(list(pool.map(partial(two_turns, client, model), questions)))
    resident, streamed_replies = runs
    assert streamed_replies == resident
    assert len(set(resident)) > 1
