"""Converter: every input layout, dtypes and quantization against transformers, shards, errors.

A converted model is upcast to float32 before it runs, so the comparisons measure what conversion
loses (rounding, quantization), not low-precision compute.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import (
    TINY_CONFIG,
    as_mlx_lm_layout,
    build_torch_model,
    rewrite_as_release_config,
    save_checkpoint,
    shared_dir,
)
from safetensors.numpy import save_file

from hunyuan_mlx import converter as module
from hunyuan_mlx import load_model
from hunyuan_mlx.cli.convert import build_parser, main
from hunyuan_mlx.converter import convert, parse_size
from hunyuan_mlx.files import INDEX_FILE
from hunyuan_mlx.models.experts import QuantizedGatheredLinear
from hunyuan_mlx.models.quantization import Q_MODE_DEFAULTS
from hunyuan_mlx.tokenizer import HunYuanTokenizer

REPO = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(0, TINY_CONFIG["vocab_size"], (2, 24))
ALPHA_ROPE = {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}
# Documented error bounds on the tiny random model (measured, with margin). Quantization error
# moves the hidden state enough to flip some top-2 routing choices, so logits can move by far more
# than the weights do; the per-weight bound is the tight one.
# name -> (convert kwargs, max relative weight error, min top-1 agreement, max mean |dlogit|)
QUANT_CASES = {
    "8bit": (dict(q_bits=8, q_group_size=32), 0.01, 0.9, 0.05),
    "4bit": (dict(q_bits=4, q_group_size=32), 0.15, 0.5, 0.4),
    "mixed": (dict(q_bits=4, q_group_size=32, quant_recipe="mixed_8"), 0.15, 0.7, 0.25),
}


def torch_logits(torch_model) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.numpy()


def mlx_logits(path: Path) -> np.ndarray:
    model = load_model(path)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(IDS)))


def read_weights(path: Path) -> dict[str, mx.array]:
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    return weights


def write_sharded(path: Path, tensors: dict[str, np.ndarray], num_files: int) -> None:
    """Replace a checkpoint's weights with `num_files` safetensors files and an index."""
    for f in list(path.glob("*.safetensors")) + list(path.glob(INDEX_FILE)):
        f.unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_files):
        file = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        part = names[i::num_files]  # interleaved, so every layer's experts span files
        save_file({k: np.ascontiguousarray(tensors[k]) for k in part}, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_no_output(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.fixture(scope="session")
def untied(tiny_checkpoint) -> tuple[Path, np.ndarray]:
    """The shared tiny checkpoint (transformers save, many shards) and its reference logits."""
    path, torch_model = tiny_checkpoint
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    experts = {f for k, f in index.items() if k.startswith("model.layers.0.mlp.experts.")}
    assert len(experts) > 1, "the fixture should split a layer's experts across shards"
    return path, torch_logits(torch_model)


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The release's layout: model_type "hunyuan", attention_head_dim, rope_scaling alpha, tied
    with an lm_head.weight anyway, tokenizer files with remote-code entries."""
    torch_model = build_torch_model(seed=1, tie_word_embeddings=True, rope_scaling=ALPHA_ROPE)
    path = save_checkpoint(torch_model, tmp_path_factory.mktemp("release"), "40KB")
    rewrite_as_release_config(
        path, auto_map={"AutoModelForCausalLM": "hunyuan.HunYuanMoEV1ForCausalLM"}
    )
    head = torch_model.state_dict()["model.embed_tokens.weight"].numpy() + 1.0  # must be ignored
    save_file({"lm_head.weight": head}, str(path / "model-head.safetensors"))
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "model-head.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    # A small tiktoken vocabulary: every byte, then merges.
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the"]
    (path / "hy.tiktoken").write_text(
        "".join(f"{__import__('base64').b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "HYTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_hy.HYTokenizer", None]},
                "eos_token": "<|eos|>",
            }
        )
    )
    (path / "tokenization_hy.py").write_text("raise RuntimeError('remote code')\n")
    return path, torch_logits(torch_model)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, untied):
    """convert(untied checkpoint, **kwargs), each distinct conversion done once per session."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("converted")

    def run(**kwargs) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in cache:
            cache[key] = root / f"out{len(cache)}"
            convert(untied[0], cache[key], **kwargs)
        return cache[key]

    return run


@pytest.fixture
def damaged(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return shutil.copytree(tiny_checkpoint[0], tmp_path / "src")


# --- dtypes and layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 1e-2), ("bfloat16", 8e-2)])
def test_dtypes_match_transformers(untied, converted, dtype, tol):
    out = converted(dtype=dtype)
    assert np.abs(mlx_logits(out) - untied[1]).max() <= tol
    for name, value in read_weights(out).items():
        expected = mx.float32 if name.endswith("gate.wg.weight") else getattr(mx, dtype)
        assert value.dtype == expected, name


def test_release_layout(release, tmp_path, capsys):
    src, reference = release
    out = tmp_path / "out"
    convert(src, out, dtype="float32")
    # After the tensors' bar, building tokenizer.json is not silent.
    assert "Writing tokenizer.json from hy.tiktoken" in capsys.readouterr().err
    assert np.abs(mlx_logits(out) - reference).max() <= 1e-4
    assert "lm_head.weight" not in read_weights(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hunyuan_v1_moe" and "auto_map" not in config
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config and "tokenizer_class" not in tokenizer_config
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 259
    assert (out / "hy.tiktoken").is_file() and (out / "generation_config.json").is_file()
    assert not (out / "tokenization_hy.py").exists()


def test_real_tokenizer_files_need_no_remote_code(tiny_checkpoint, tmp_path):
    """With the release's tokenizer files, the output loads in transformers without its code."""
    from transformers import AutoTokenizer

    from hunyuan_mlx.tokenizer import HunYuanTokenizer

    src = shutil.copytree(tiny_checkpoint[0], tmp_path / "src")
    for name in ("hy.tiktoken", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(shared_dir() / name, src / name)
    out = tmp_path / "out"
    convert(src, out)
    text = "Hello, 世界! <|startoftext|>This is   a test\n\n 123456"
    expected = HunYuanTokenizer.from_tiktoken(src / "hy.tiktoken").encode(text)
    assert HunYuanTokenizer.from_tokenizer_json(out / "tokenizer.json").encode(text) == expected
    assert AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == expected
    assert json.loads((out / "generation_config.json").read_text())["top_k"] == 20


def test_release_layout_4bit_quantizes_the_tied_embedding(release, tmp_path):
    src, reference = release
    out = tmp_path / "out"
    convert(src, out, quantize=True, q_group_size=32)
    weights = read_weights(out)
    assert "model.embed_tokens.scales" in weights
    top1 = (mlx_logits(out).argmax(-1) == reference.argmax(-1)).mean()
    assert top1 >= QUANT_CASES["4bit"][2]


def test_transformers_fused_experts(tiny_checkpoint, tmp_path):
    path, torch_model = tiny_checkpoint
    src = shutil.copytree(path, tmp_path / "src")
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    write_sharded(src, state, num_files=4)
    convert(src, tmp_path / "out", dtype="float32")
    assert np.abs(mlx_logits(tmp_path / "out") - torch_logits(torch_model)).max() <= 1e-4


# --- quantization ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_within_bounds(untied, converted, case):
    kwargs, max_weight_error, min_top1, max_mean_error = QUANT_CASES[case]
    out = converted(quantize=True, dtype="float32", **kwargs)
    reference = read_weights(converted(dtype="float32"))
    quantized = read_weights(out)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    for name in [n for n in quantized if n.endswith(".scales")]:
        module = name.removesuffix(".scales")
        params = {**quantization, **quantization.get(module, {})}
        weight = mx.dequantize(
            quantized[f"{module}.weight"],
            quantized[name],
            quantized[f"{module}.biases"],
            params["group_size"],
            params["bits"],
        )
        original = reference[f"{module}.weight"]
        error = mx.linalg.norm((weight - original).flatten()) / mx.linalg.norm(original.flatten())
        assert error.item() <= max_weight_error, module
    logits = mlx_logits(out)
    assert (logits.argmax(-1) == untied[1].argmax(-1)).mean() >= min_top1
    assert np.abs(logits - untied[1]).mean() <= max_mean_error


def test_mixed_recipe_config_rebuilds_the_same_modules(converted):
    out = converted(quantize=True, dtype="float32", **QUANT_CASES["mixed"][0])
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: quantization[k] for k in ("bits", "group_size", "mode")} == {
        "bits": 4,
        "group_size": 32,
        "mode": "affine",
    }
    assert quantization["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert quantization["model.layers.0.mlp.shared_mlp.down_proj"]["bits"] == 8
    assert quantization["model.embed_tokens"]["bits"] == 8
    assert "model.layers.0.mlp.experts.gate_up_proj" not in quantization
    model = load_model(out)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.experts.gate_up_proj, QuantizedGatheredLinear)
    assert layer.mlp.experts.gate_up_proj.bits == 4
    assert layer.self_attn.q_proj.bits == 8 and model.lm_head.bits == 8
    assert layer.mlp.gate.wg.weight.dtype == mx.float32 and "scales" not in layer.mlp.gate.wg


def test_group_size_that_does_not_divide_a_width_leaves_that_module(converted):
    """The tiny expert width (32) is not a multiple of 64: down_proj stays unquantized."""
    out = converted(quantize=True)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.mlp.experts.down_proj"] is False
    model = load_model(out)
    assert "scales" not in model.model.layers[0].mlp.experts.down_proj
    assert "scales" in model.model.layers[0].mlp.experts.gate_up_proj


@pytest.mark.parametrize("mode", [m for m in Q_MODE_DEFAULTS if m != "affine"])
def test_non_affine_modes_load(untied, converted, mode):
    out = converted(quantize=True, q_mode=mode)
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == mode
    assert (mlx_logits(out).argmax(-1) == untied[1].argmax(-1)).mean() >= 0.5


def test_dequantize_round_trip(converted, tmp_path):
    four_bit = converted(quantize=True, dtype="float32", q_group_size=32)
    out = tmp_path / "dequantized"
    convert(four_bit, out, dequantize=True, dtype="float32")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert not [n for n in read_weights(out) if n.endswith(".scales")]
    np.testing.assert_allclose(mlx_logits(out), mlx_logits(four_bit), atol=1e-4)


def test_mlx_lm_switch_mlp_layout_requantizes(converted, tmp_path):
    """mlx-lm's layout and per-module entries (switch_mlp paths) read back; -q with --dequantize
    re-quantizes."""
    four_bit = converted(quantize=True, dtype="float32", q_group_size=32)
    src = shutil.copytree(four_bit, tmp_path / "src")
    tensors = as_mlx_lm_layout(read_weights(src))
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {
        k.replace(".experts.", ".switch_mlp."): v for k, v in config["quantization"].items()
    }
    (src / "config.json").write_text(json.dumps(config))
    write_sharded(src, tensors, num_files=3)
    dequantized = tmp_path / "dequantized"
    convert(src, dequantized, dequantize=True, dtype="float32")
    np.testing.assert_allclose(mlx_logits(dequantized), mlx_logits(four_bit), atol=1e-4)
    eight_bit = tmp_path / "eight_bit"
    convert(
        src, eight_bit, quantize=True, dequantize=True, q_bits=8, q_group_size=32, dtype="float32"
    )
    assert json.loads((eight_bit / "config.json").read_text())["quantization"]["bits"] == 8
    assert load_model(eight_bit).model.layers[0].self_attn.q_proj.bits == 8


# --- output files ---------------------------------------------------------------------------


def test_shards_respect_the_limit_and_the_index_is_complete(untied, converted):
    out = converted(dtype="float32", max_shard_size="150KB")  # largest tensor: 131 KB
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3
    assert [f.name for f in shards] == [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    assert all(f.stat().st_size <= 150_000 for f in shards)
    index = json.loads((out / INDEX_FILE).read_text())
    contents = {f.name: mx.load(str(f)) for f in shards}
    assert index["weight_map"] == {k: f for f, ws in contents.items() for k in ws}
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for ws in contents.values() for v in ws.values()
    )
    assert index["weight_map"].keys() == read_weights(converted(dtype="float32")).keys()


def test_summary(converted, tiny_checkpoint, tmp_path, capsys):
    summary = convert(
        tiny_checkpoint[0], tmp_path / "out", quantize=True, q_bits=4, q_group_size=32
    )
    assert summary.parameters == sum(p.numel() for n, p in tiny_checkpoint[1].named_parameters())
    assert 4 < summary.bits_per_weight < 6
    assert summary.precision["routed experts"] == {"4-bit affine g32": 2 * 8 * 3 * 64 * 32}
    assert summary.precision["router"] == {"float32": 2 * 8 * 64}
    assert "bits per weight" in capsys.readouterr().out


def test_streams_shards_in_and_out(untied, tmp_path, monkeypatch):
    """Output shards are written while input shards are still to be read."""
    events = []
    load, save = mx.load, mx.save_safetensors

    def logged_load(file, *args, **kwargs):
        events.append("load")
        return load(file, *args, **kwargs)

    def logged_save(file, arrays, *args, **kwargs):
        events.append("save")
        return save(file, arrays, *args, **kwargs)

    monkeypatch.setattr(module.mx, "load", logged_load)
    monkeypatch.setattr(module.mx, "save_safetensors", logged_save)
    convert(untied[0], tmp_path / "out", dtype="float32", max_shard_size="150KB")
    assert events.count("load") == 13 and events.count("save") > 3
    assert events.index("save") < len(events) - 1 - events[::-1].index("load")


# --- errors: a clear message, no output ---------------------------------------------------


def test_missing_config(damaged, tmp_path):
    (damaged / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(damaged, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_shard_listed_in_index_but_absent(damaged, tmp_path):
    (damaged / "model-00003-of-00013.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00013.safetensors"):
        convert(damaged, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_truncated_shard(damaged, tmp_path):
    file = damaged / "model-00002-of-00013.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model-00002-of-00013.safetensors is truncated"):
        convert(damaged, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_corrupt_header(damaged, tmp_path):
    file = damaged / "model-00002-of-00013.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff" * 8
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model-00002-of-00013.safetensors is corrupt"):
        convert(damaged, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def _replace_tensor(src: Path, name: str, value: np.ndarray) -> str:
    """Put `value` under `name` in the shard that holds it; returns the shard's file name."""
    file = json.loads((src / INDEX_FILE).read_text())["weight_map"][name]
    tensors = {k: np.array(v) for k, v in mx.load(str(src / file)).items()}
    tensors[name] = value
    save_file(tensors, str(src / file))
    return file


def test_shape_disagrees_with_config(damaged, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight"
    file = _replace_tensor(damaged, name, np.zeros((64, 60), np.float32))
    with pytest.raises(ValueError, match=rf"{name} \(in {file}\) has shape \(64, 60\)"):
        convert(damaged, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_expert_shape_disagrees_with_config(damaged, tmp_path):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    _replace_tensor(damaged, name, np.zeros((32, 60), np.float32))
    with pytest.raises(ValueError, match=rf"{name} in .* has shape \(32, 60\)"):
        convert(damaged, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_unsupported_dtype(damaged, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    file = _replace_tensor(damaged, name, np.zeros((64, 64), np.int8))
    with pytest.raises(ValueError, match=rf"{name} in .*{file} has dtype I8"):
        convert(damaged, tmp_path / "out")
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q_bits=7), "bits=7"),
        (dict(q_group_size=16), "group_size=16"),
        (dict(q_mode="mxfp4", q_group_size=64), "mxfp4"),
        (dict(q_mode="nvfp4", quant_recipe="mixed_6"), "only the affine mode"),
        (dict(q_mode="int3"), "Unknown quantization mode"),
    ],
)
def test_quantization_mlx_cannot_do(untied, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert(untied[0], tmp_path / "out", quantize=True, **kwargs)
    assert_no_output(tmp_path / "out")


def test_option_conflicts(untied, converted, tmp_path):
    with pytest.raises(ValueError, match="need -q"):
        convert(untied[0], tmp_path / "out", q_bits=4)
    with pytest.raises(ValueError, match="needs a quantized"):
        convert(untied[0], tmp_path / "out", quantize=True, dequantize=True)
    with pytest.raises(ValueError, match="needs a quantized"):
        convert(untied[0], tmp_path / "out", dequantize=True)
    with pytest.raises(ValueError, match="already quantized"):
        convert(converted(quantize=True), tmp_path / "out")
    # Re-quantizing a quantized model only when asked to dequantize first, explicitly.
    with pytest.raises(ValueError, match=r"already quantized \(4-bit\): convert from the original"):
        convert(converted(quantize=True), tmp_path / "out", quantize=True, q_bits=8)
    with pytest.raises(ValueError, match="max_shard_size|Cannot read size"):
        convert(untied[0], tmp_path / "out", max_shard_size="5 parsecs")
    assert_no_output(tmp_path / "out")


def test_existing_destination_needs_force(untied, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        convert(untied[0], dst)
    assert (dst / "keep.txt").read_text() == "mine"
    convert(untied[0], dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_never_overwrites_the_source(damaged):
    before = sorted(p.name for p in damaged.iterdir())
    for dst in (damaged, damaged.parent):
        with pytest.raises(ValueError, match="would overwrite the source"):
            convert(damaged, dst, force=True)
    assert sorted(p.name for p in damaged.iterdir()) == before


def test_interrupt_removes_the_partial_output(untied, tmp_path, monkeypatch):
    calls = []

    def interrupted_save(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return mx.save_safetensors(*args, **kwargs)

    monkeypatch.setattr(module.mx, "save_safetensors", interrupted_save, raising=True)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(untied[0], dst, max_shard_size="20KB")
    monkeypatch.undo()
    assert len(calls) == 2
    assert_no_output(dst)


# --- command line ---------------------------------------------------------------------------


PROG_ERROR = "python -m hunyuan_mlx.convert: error: "


# The command's module, whose `convert` the interrupt test replaces.
convert_command = importlib.import_module("hunyuan_mlx.cli.convert")


def exit_status(argv: list[str]) -> int:
    """The exit status of the convert CLI run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_cli_error_is_one_line(tmp_path, capsys):
    argv = ["--hf-path", str(tmp_path / "nowhere"), "--mlx-path", str(tmp_path / "o")]
    assert exit_status(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(PROG_ERROR) and "\n" not in err


def test_cli_interrupt_exits_130(untied, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_command, "convert", interrupted)
    assert exit_status(["--hf-path", str(untied[0]), "--mlx-path", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == PROG_ERROR + "interrupted"


def test_cli_wrapper_and_module(damaged, tmp_path):
    (damaged / "config.json").unlink()
    args = ["--hf-path", str(damaged), "--mlx-path", str(tmp_path / "o")]
    runs = [  # both at once: each spends its time importing
        subprocess.Popen(
            [sys.executable, *entry, *args], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for entry in (["convert.py"], ["-m", "hunyuan_mlx.convert"])
    ]
    for run in runs:
        _, stderr = run.communicate()
        assert run.returncode == 1
        assert stderr.strip() == f"{PROG_ERROR}No config.json in {damaged}"
    assert_no_output(tmp_path / "o")


def test_cli_runs_the_conversion(untied, tmp_path):
    dst = tmp_path / "out"
    argv = ["--hf-path", str(untied[0]), "--mlx-path", str(dst), "-q", "--q-group-size", "32"]
    main([*argv, "--quant-recipe", "mixed_6", "--dtype", "float32"])
    assert json.loads((dst / "config.json").read_text())["quantization"]["group_size"] == 32


def test_parser_flags():
    args = build_parser().parse_args(
        ["--hf-path", "a/b", "--upload-repo", "me/x", "-q", "--q-mode", "mxfp4", "--force"]
    )
    assert (args.upload_repo, args.q_mode, args.force, args.quantize) == ("me/x", "mxfp4", 1, 1)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KiB") == 40 * 1024


# --- nothing lost: signals, leftovers, modes, files, upload ---------------------------------

# The converter slowed down in its child process, so that a signal lands mid-conversion.
SLOW_CONVERT = """
import sys, time
import hunyuan_mlx.converter as converter
write = converter._write_tensor
converter._write_tensor = lambda *a: (time.sleep(0.05), write(*a))
from hunyuan_mlx.cli.convert import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_conversion_leaves_nothing(untied, tmp_path, signum):
    dst = tmp_path / "out"
    args = ["--hf-path", str(untied[0]), "--mlx-path", str(dst)]
    run = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, *args], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.*.tmp")), "the conversion never started writing"
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signum
    assert stderr.strip().endswith(PROG_ERROR.strip() + " interrupted" + (
        "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
    ))
    assert_no_output(dst)


def test_leftover_of_a_killed_run_is_reported_then_removed_with_force(untied, tmp_path, capsys):
    dst = tmp_path / "out"
    leftover = tmp_path / ".out.k1ll3d.tmp"
    leftover.mkdir()
    (leftover / "model-00001.safetensors").write_bytes(b"partial")
    convert(untied[0], dst)
    assert capsys.readouterr().err == (
        f"Note: an earlier run writing {dst} left a partial output: {leftover} "
        "(remove it, or pass --force to have it removed)\n"
    )
    assert leftover.is_dir()
    convert(untied[0], dst, force=True)
    assert "Removed the partial output" in capsys.readouterr().err
    assert not leftover.exists() and (dst / "config.json").is_file()


def test_output_folder_has_the_umask_mode(untied, tmp_path):
    umask = os.umask(0o022)
    try:
        convert(untied[0], tmp_path / "out")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_destination_that_is_a_file(untied, tmp_path):
    dst = tmp_path / "out"
    dst.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        convert(untied[0], dst)
    assert dst.is_file()


def test_upload_failure_is_one_line_and_keeps_the_output(untied, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    class ConnectError(Exception):  # the Hub client's errors are not all OSErrors (httpx)
        pass

    def offline(*args, **kwargs):
        raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    dst = tmp_path / "out"
    argv = ["--hf-path", str(untied[0]), "--mlx-path", str(dst), "--upload-repo", "me/model"]
    assert exit_status(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Could not upload to the Hub repo me/model" in err
    assert f"the converted model is in {dst}" in err
    card = (dst / "README.md").read_text()
    assert "library_name: mlx" in card and str(untied[0]) in card


def test_model_card_names_a_hub_source_as_base_model(untied, tmp_path, monkeypatch):
    """The card's metadata (read back by huggingface_hub) has mlx-lm's keys; a Hub repo id
    source is its base_model, a local folder is not."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(untied[0]))
    convert("tencent/Hunyuan-A13B-Instruct", tmp_path / "hub", quantize=True)
    convert(untied[0], tmp_path / "local")
    hub, local = (ModelCard.load(tmp_path / name / "README.md") for name in ("hub", "local"))
    assert hub.data.base_model == "tencent/Hunyuan-A13B-Instruct" and local.data.base_model is None
    assert hub.data.library_name == "mlx" and hub.data.pipeline_tag == "text-generation"
    assert "4-bit affine, group size 64" in hub.text and "hunyuan_mlx.generate" in hub.text
    assert str(untied[0]) in local.text and "(unquantized)" in local.text


def test_converted_config_reads_in_transformers(tmp_path):
    """transformers 5 reads the config.json we write (RoPE keys it requires kept) and, with the
    source weights, builds the model whose logits ours equal."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_model = build_torch_model(seed=2, rope_scaling=ALPHA_ROPE)
    src = save_checkpoint(torch_model, tmp_path / "src")
    rewrite_as_release_config(src)  # rope_theta + rope_scaling with alpha, as the release
    out = tmp_path / "out"
    convert(src, out, dtype="float32")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "hunyuan_v1_moe" and config.rope_parameters["alpha"] == 1000.0
    hf = shutil.copytree(src, tmp_path / "hf")
    shutil.copyfile(out / "config.json", hf / "config.json")
    theirs = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert np.abs(torch_logits(theirs) - torch_logits(torch_model)).max() <= 1e-4
    assert np.abs(mlx_logits(out) - torch_logits(theirs)).max() <= 1e-4


def test_converted_tokenizer_reads_in_transformers(tiny_release, tmp_path):
    """AutoTokenizer opens a converted folder (no remote code) and encodes as ours does."""
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    convert(tiny_release, out)
    theirs = AutoTokenizer.from_pretrained(out)
    ours = HunYuanTokenizer.from_pretrained(out)
    for text in ("Why is the sky blue?", "车系：奥迪q5l；宝马x5", "<think>\n</think>\n<answer>x"):
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)


def test_mlx_lm_quant_predicate_is_an_alias(untied, tmp_path, capsys):
    """mlx-lm's --quant-predicate names our recipes; its own recipes, which none of ours equals,
    are refused in one line with the nearest recipe here."""
    args = build_parser().parse_args(["--hf-path", "a/b", "--quant-predicate", "mixed_8"])
    assert args.quant_recipe == "mixed_8"
    dst = tmp_path / "out"
    argv = ["--hf-path", str(untied[0]), "--mlx-path", str(dst), "-q"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--quant-predicate", "mixed_4_6"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith(PROG_ERROR) and err.count("\n") == 1
    assert "mixed_4_6 is an mlx-lm recipe" in err and "--q-bits 4 --quant-recipe mixed_6" in err
    assert not dst.exists()
