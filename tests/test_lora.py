"""LoRA training, adapters, resume and fuse on tiny models, with the real tokenizer and car data.

The vocabulary head dominates the cost of a 128k-vocabulary model on a CPU, so the training tests
run a model whose vocabulary is just the ids the car slice uses: the examples are tokenized with
the real tokenizer and chat template, then their ids are renumbered densely. The CLI test uses a
full-vocabulary model on a few very short records.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from helpers import (
    RELEASE_FILES,
    RELEASE_VOCAB_TRAIN,
    build_torch_model,
    load_example,
    save_checkpoint,
    shared_dir,
)
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import iterate_batches

from hunyuan_mlx import load, load_model
from hunyuan_mlx.cli.fuse import main as fuse_main
from hunyuan_mlx.cli.lora import main as lora_main
from hunyuan_mlx.files import read_jsonl
from hunyuan_mlx.models import FastPaths, HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
from hunyuan_mlx.models.fast_paths import set_fast_paths, using
from hunyuan_mlx.models.hf_compat import IGNORE_INDEX
from hunyuan_mlx.models.quantization import apply_quantization
from hunyuan_mlx.tokenizer import HunYuanTokenizer
from hunyuan_mlx.tuner.adapters import LoRAGatheredLinear, load_adapters, prepare_model
from hunyuan_mlx.tuner.data import load_examples
from hunyuan_mlx.tuner.fuse import fuse
from hunyuan_mlx.tuner.fuse import save_checkpoint as save_mlx_checkpoint
from hunyuan_mlx.tuner.trainer import LoRAConfig, masked_loss, optimizer_file, train

evaluate_car = load_example("lora/evaluate_car.py")

MAX_SEQ_LENGTH = 128
# Quick to train: a high learning rate and every layer, experts included.
TRAIN_OPTIONS = dict(
    fine_tune_type="lora",
    num_layers=-1,
    batch_size=4,
    learning_rate=2e-3,
    max_seq_length=MAX_SEQ_LENGTH,
    val_batches=-1,
    steps_per_report=5,
    steps_per_eval=10,
    save_every=10,
)


class Recorder(TrainingCallback):
    def __init__(self) -> None:
        self.train: list[dict] = []
        self.val: list[dict] = []
        self.events: list[dict] = []  # both, in order

    def on_train_loss_report(self, train_info: dict) -> None:
        self.train.append(train_info)
        self.events.append(train_info)

    def on_val_loss_report(self, val_info: dict) -> None:
        self.val.append(val_info)
        self.events.append(val_info)


def write_model(path: Path, vocab_size: int) -> Path:
    save_checkpoint(build_torch_model(vocab_size=vocab_size, **RELEASE_VOCAB_TRAIN), path)
    for name in RELEASE_FILES:
        shutil.copyfile(shared_dir() / name, path / name)
    return path


@pytest.fixture(scope="session")
def tokenizer() -> HunYuanTokenizer:
    return HunYuanTokenizer.from_pretrained(shared_dir())


@pytest.fixture(scope="session")
def car_splits(tmp_path_factory, tokenizer):
    """(train, valid, vocab size): 64 + 16 car examples with densely renumbered token ids."""
    lines = (shared_dir() / "car" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    directory = tmp_path_factory.mktemp("car")
    splits = []
    for name, chunk in (("train", lines[:64]), ("valid", lines[64:80])):
        (directory / f"{name}.jsonl").write_text("\n".join(chunk) + "\n", encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a few long titles are truncated
            splits.append(load_examples(directory / f"{name}.jsonl", tokenizer, MAX_SEQ_LENGTH))
    ids = sorted({t for split in splits for tokens, _ in split for t in tokens})
    dense = {t: i for i, t in enumerate(ids)}
    train_set, valid_set = (
        [([dense[t] for t in tokens], offset) for tokens, offset in s] for s in splits
    )
    return train_set, valid_set, len(ids)


@pytest.fixture(scope="session")
def dense_model_dir(tmp_path_factory, car_splits) -> Path:
    return write_model(tmp_path_factory.mktemp("dense"), car_splits[2])


@pytest.fixture(scope="session")
def trained(tmp_path_factory, dense_model_dir, car_splits):
    """(model, adapter dir, recorder) after 30 LoRA iterations on the car slice."""
    train_set, valid_set, _ = car_splits
    adapter_path = tmp_path_factory.mktemp("adapters")
    model = load_model(dense_model_dir)
    recorder = Recorder()
    config = LoRAConfig(iters=30, adapter_path=str(adapter_path), **TRAIN_OPTIONS)
    train(model, train_set, valid_set, config, recorder)
    model.eval()
    return model, adapter_path, recorder


def probe(vocab_size: int) -> mx.array:
    return mx.array(np.random.default_rng(0).integers(0, vocab_size, (2, 12)))


def test_training_and_validation_losses_fall(trained):
    _, adapter_path, recorder = trained
    train_losses = [r["train_loss"] for r in recorder.train]
    val_losses = [r["val_loss"] for r in recorder.val]
    assert [r["iteration"] for r in recorder.train] == [5, 10, 15, 20, 25, 30]
    # Validated where checkpoints are written (10, 20, 30): the final adapters too.
    assert [r["iteration"] for r in recorder.val] == [0, 10, 20, 30]
    assert train_losses[-1] < 0.8 * train_losses[0]
    assert val_losses[-1] < 0.85 * val_losses[0]
    for key in ("learning_rate", "iterations_per_second", "tokens_per_second", "peak_memory"):
        assert recorder.train[-1][key] > 0
    names = {p.name for p in adapter_path.iterdir()}
    for it in (10, 20, 30):
        assert {f"{it:07d}_adapters.safetensors", f"{it:07d}_optimizer.safetensors"} <= names
    assert {"adapters.safetensors", "optimizer.safetensors", "adapter_config.json"} <= names
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    assert "mlp.experts.gate_up_proj" in config["lora_parameters"]["keys"]


def test_adapters_reload_to_identical_logits(trained, dense_model_dir, car_splits):
    model, adapter_path, _ = trained
    reloaded, _ = load(dense_model_dir, adapter_path=adapter_path)
    x = probe(car_splits[2])
    assert mx.array_equal(model(x), reloaded(x))
    base = load_model(dense_model_dir)
    assert not mx.allclose(base(x), model(x), atol=1e-3)


def test_fused_model_matches_base_plus_adapters(trained, dense_model_dir, car_splits, tmp_path):
    model, adapter_path, _ = trained
    fuse_main(
        [
            "--model",
            str(dense_model_dir),
            "--adapter-path",
            str(adapter_path),
            "--save-path",
            str(tmp_path / "fused"),
        ]
    )
    fused = load_model(tmp_path / "fused")
    x = probe(car_splits[2])
    assert mx.allclose(fused(x), model(x), atol=1e-4, rtol=0)
    assert (tmp_path / "fused" / "hy.tiktoken").is_file()
    assert not any("lora" in name for name, _ in tree_flatten(fused.parameters()))


def test_qlora_on_quantized_base_and_fuse(dense_model_dir, car_splits, tmp_path):
    """Adapters train over a 4-bit base; fused with --dequantize they match exactly, and fused
    re-quantized they load as a quantized checkpoint."""
    train_set, valid_set, vocab_size = car_splits
    base = load_model(dense_model_dir)
    base.config.quantization = {"group_size": 32, "bits": 4, "mode": "affine"}
    apply_quantization(base, base.config.quantization)
    quantized_dir = save_mlx_checkpoint(base, base.config, dense_model_dir, tmp_path / "q4")

    model = load_model(quantized_dir)
    config = LoRAConfig(iters=4, adapter_path=str(tmp_path / "ad"), **TRAIN_OPTIONS)
    train(model, train_set, valid_set, config)
    model.eval()
    experts = model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(experts, LoRAGatheredLinear) and "scales" in experts.linear
    assert experts.lora_a.dtype == mx.float32

    x = probe(vocab_size)
    plain = fuse(quantized_dir, tmp_path / "ad", tmp_path / "f32", dequantize=True)
    assert "quantization" not in json.loads((plain / "config.json").read_text())
    assert mx.allclose(load_model(plain)(x), model(x), atol=1e-4, rtol=0)
    requantized = fuse(quantized_dir, tmp_path / "ad", tmp_path / "f4")
    assert json.loads((requantized / "config.json").read_text())["quantization"]["bits"] == 4
    # Re-quantized with the base's parameters: within a quantization step of the exact sum,
    # which has moved further than that from the base.
    experts = load_model(requantized).layers[0].mlp.experts.gate_up_proj
    exact = load_model(plain).layers[0].mlp.experts.gate_up_proj.weight
    assert experts.bits == 4 and experts.group_size == 32
    step = mx.abs(mx.repeat(experts.scales, 32, axis=-1))
    assert mx.all(mx.abs(experts.dense_weight() - exact) <= step)
    base_experts = load_model(quantized_dir).layers[0].mlp.experts.gate_up_proj
    assert mx.any(mx.abs(base_experts.dense_weight() - exact) > step)


def test_resume_continues_steps_and_optimizer(dense_model_dir, car_splits, tmp_path):
    train_set, valid_set, _ = car_splits
    options = {**TRAIN_OPTIONS, "save_every": 3, "steps_per_eval": 100}

    def run(directory: str, iters: int, resume: str | None = None):
        model = load_model(dense_model_dir)
        config = LoRAConfig(
            iters=iters, adapter_path=directory, resume_adapter_file=resume, **options
        )
        recorder = Recorder()
        train(model, train_set, valid_set, config, recorder)
        return recorder

    straight_run = run(str(tmp_path / "straight"), 6)
    run(str(tmp_path / "first"), 3)
    resumed = run(
        str(tmp_path / "second"), 6, str(tmp_path / "first" / "0000003_adapters.safetensors")
    )
    assert [r["iteration"] for r in resumed.train] == [5, 6]
    # The count of trained tokens goes on from the checkpoint's.
    assert resumed.train[-1]["trained_tokens"] == straight_run.train[-1]["trained_tokens"]
    assert (tmp_path / "second" / "0000006_adapters.safetensors").is_file()
    straight = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    second = mx.load(str(tmp_path / "second" / "adapters.safetensors"))
    for name, value in straight.items():
        assert mx.allclose(second[name], value, atol=1e-6), name
    state = mx.load(str(optimizer_file(tmp_path / "second" / "adapters.safetensors")))
    assert state["step"].item() == 6


def test_expert_lora_gradient_only_for_routed_experts(dense_model_dir, monkeypatch):
    model = load_model(dense_model_dir)
    prepare_model(model, "lora", -1, {"keys": ["experts"]})
    for _, module in model.named_modules():
        if isinstance(module, LoRAGatheredLinear):
            module.lora_b = mx.random.normal(module.lora_b.shape)
    used: dict[int, set[int]] = {}
    call = LoRAGatheredLinear.__call__

    def spy(self, x, indices, sorted_indices=False, lhs_indices=None):
        used.setdefault(id(self), set()).update(np.array(indices).ravel().tolist())
        return call(self, x, indices, sorted_indices, lhs_indices)

    monkeypatch.setattr(LoRAGatheredLinear, "__call__", spy)
    batch = mx.array([[5, 17, 3]])

    def loss(params):
        model.update(params)
        return model(batch).astype(mx.float32).sum()

    grads = dict(tree_flatten(mx.grad(loss)(model.trainable_parameters())))
    modules = {name: m for name, m in model.named_modules() if isinstance(m, LoRAGatheredLinear)}
    assert modules
    for name, module in modules.items():
        experts = used[id(module)]
        assert 0 < len(experts) < 8
        for leaf in ("lora_a", "lora_b"):
            grad = np.array(grads[f"{name}.{leaf}"])
            for e in range(8):
                if e in experts:
                    assert np.abs(grad[e]).max() > 0, (name, leaf, e)
                else:
                    assert np.all(grad[e] == 0), (name, leaf, e)


def test_prompt_tokens_carry_no_loss(tokenizer, tmp_path):
    record = json.loads((shared_dir() / "car" / "train.jsonl").open(encoding="utf-8").readline())
    (tmp_path / "chat.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    prompt, answer = record["messages"][1]["content"], record["messages"][2]["content"]
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
    for name in ("chat.jsonl", "pc.jsonl"):
        [(tokens, offset)] = load_examples(tmp_path / name, tokenizer, 512)
        assert offset > 0
        assert tokenizer.decode(tokens[offset:]) == answer + "<|eos|>"
        [(unmasked_tokens, zero)] = load_examples(
            tmp_path / name, tokenizer, 512, mask_prompt=False
        )
        assert unmasked_tokens == tokens and zero == 0

    # The training loss over a padded batch counts exactly the answer tokens.
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(1, len(tokens) - 1, 50)).astype(np.float32))
    small = [t % 50 for t in tokens]
    batch, lengths = next(iterate_batches([(small, offset)], 1, 512))
    assert batch.shape[1] > len(tokens)  # padded

    class Fixed:
        def __call__(self, inputs):
            return mx.pad(logits, [(0, 0), (0, inputs.shape[1] - logits.shape[1]), (0, 0)])

    loss, ntokens = masked_loss(Fixed(), batch, lengths)
    assert ntokens.item() == len(tokens) - offset
    labels = np.array(small)
    labels[:offset] = IGNORE_INDEX
    targets = labels[1:]
    log_probs = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)
    expected = -np.mean(
        [np.array(log_probs)[i, t] for i, t in enumerate(targets) if t != IGNORE_INDEX]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_malformed_lines_name_file_and_line(tokenizer, tmp_path):
    good = json.dumps({"text": "hello"})
    cases = {
        "broken.jsonl": (f"{good}\n{{not json\n", "broken.jsonl, line 2: not valid JSON"),
        "array.jsonl": (f"{good}\n\n[1, 2]\n", "array.jsonl, line 3: expected a JSON object"),
        "mixed.jsonl": (f'{good}\n{{"prompt": "a", "completion": "b"}}\n', "mixed.jsonl, line 2"),
        "type.jsonl": (f'{good}\n{{"text": 3}}\n', "type.jsonl, line 2: 'text' must be a str"),
        "unknown.jsonl": ('{"question": "a"}\n', "unknown.jsonl, line 1: unknown record format"),
        "roles.jsonl": (
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            "line 1: with the prompt",
        ),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            load_examples(tmp_path / name, tokenizer, 64)
    (tmp_path / "text.jsonl").write_text(good + "\n")
    with pytest.raises(ValueError, match="no prompt to mask"):
        load_examples(tmp_path / "text.jsonl", tokenizer, 64, mask_prompt=True)
    assert read_jsonl(tmp_path / "text.jsonl") == [(1, {"text": "hello"})]


def test_truncation_warning_counts_examples(tokenizer, tmp_path):
    records = [{"text": "word " * n} for n in (2, 40, 60)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match="2 of 3 examples are longer than max_seq_length=16"):
        examples = load_examples(tmp_path / "t.jsonl", tokenizer, 16)
    assert [len(tokens) for tokens, _ in examples] == [4, 16, 16]


@pytest.fixture(scope="session")
def full_vocab_model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("full_vocab"), 128167)


def test_cli_with_yaml_config_full_vocabulary(tmp_path_factory, full_vocab_model_dir, capsys):
    """`python -m hunyuan_mlx.lora -c config.yaml` end to end on the real vocabulary."""
    tmp = tmp_path_factory.mktemp("cli")
    model_dir = full_vocab_model_dir
    data = tmp / "data"
    data.mkdir()
    records = [{"prompt": f"车系{i}", "completion": f"奥迪q{i}"} for i in range(4)]
    for split in ("train", "valid", "test"):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
    config_file = tmp / "lora.yaml"
    config_file.write_text(
        f"model: {model_dir}\ndata: {data}\ntrain: true\nbatch_size: 2\niters: 2\n"
        "val_batches: 1\ntest_batches: 1\nsteps_per_report: 1\nlora_rank: 4\nlora_alpha: 8\n"
        "lora_targets: [attention, experts]\nlr_schedule: cosine\nwarmup: 1\n"
    )
    adapters = tmp / "adapters"
    lora_main(
        ["-c", str(config_file), "--adapter-path", str(adapters), "--test", "--num-layers", "1"]
    )
    out = capsys.readouterr().out
    assert "Iter 2: Train loss" in out and "Test loss" in out
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 2.0
    assert config["num_layers"] == 1 and config["lr_schedule"] == "cosine"
    assert "self_attn.q_proj" in config["lora_parameters"]["keys"]
    assert "mlp.shared_mlp.up_proj" not in config["lora_parameters"]["keys"]
    model, _ = load(model_dir, adapter_path=adapters)
    assert isinstance(model.layers[1].mlp.experts.down_proj, LoRAGatheredLinear)
    assert not isinstance(model.layers[0].mlp.experts.down_proj, LoRAGatheredLinear)
    config_file.write_text("lora_rnak: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        lora_main(["-c", str(config_file)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("python -m hunyuan_mlx.lora: error: ") and "unknown keys lora_rnak" in err


def test_yaml_takes_mlx_lm_lora_parameters(tmp_path, capsys):
    """mlx-lm's `lora_parameters: {rank, scale, dropout, keys}` block sets our fields."""
    from hunyuan_mlx.cli.lora import build_parser, config_from_args

    config_file = tmp_path / "lora.yaml"
    config_file.write_text(
        "lora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 0.1\n"
        "  keys: [self_attn.q_proj, self_attn.v_proj]\ndtype: checkpoint\n"
    )
    config = config_from_args(build_parser().parse_args(["-c", str(config_file)]))
    assert (config.lora_rank, config.lora_scale, config.lora_dropout) == (4, 10.0, 0.1)
    assert config.lora_targets == ["self_attn.q_proj", "self_attn.v_proj"]
    assert config.dtype == "checkpoint"
    config_file.write_text("lora_rank: 8\nlora_parameters: {rank: 4, alpha: 2}\n")
    with pytest.raises(SystemExit) as exit_info:
        lora_main(["-c", str(config_file)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "unknown lora_parameters keys alpha" in err
    config_file.write_text("lora_rank: 8\nlora_parameters: {rank: 4}\n")
    with pytest.raises(ValueError, match="both lora_rank and lora_parameters.rank"):
        config_from_args(build_parser().parse_args(["-c", str(config_file)]))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("iters: 2\nlora_rank: [8\nbatch_size: 2\n", "line 3: not valid YAML: expected ','"),
        ("- lora_rank\n- 8\n", "expected a mapping of option names to values"),
        ("iters: 2\nlora_rank: eight\n", "line 2: lora_rank: expected an integer, got 'eight'"),
        ("lora_parameters:\n  scale: high\n", "line 2: lora_scale: expected a number, got 'high'"),
        ("lora_targets: [attention, 3]\n", "line 1: lora_targets: expected a list of strings"),
    ],
)
def test_a_bad_yaml_config_is_one_line_naming_file_line_and_key(tmp_path, capsys, text, error):
    """Issue 25 item 4: no traceback, no message from deep inside the run."""
    config_file = tmp_path / "lora.yaml"
    config_file.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        lora_main(["-c", str(config_file)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"python -m hunyuan_mlx.lora: error: {config_file}") and error in err


def test_yaml_numbers_read_as_mlx_lm_reads_them(tmp_path):
    """`1e-4` is a number, as mlx-lm's lora reads it (YAML 1.1 would make it a string)."""
    from hunyuan_mlx.cli.lora import build_parser, config_from_args

    config_file = tmp_path / "lora.yaml"
    config_file.write_text("learning_rate: 1e-4\nlr_schedule: {name: cosine_decay, "
                           "arguments: [1e-5, 100]}\n")  # fmt: skip
    config = config_from_args(build_parser().parse_args(["-c", str(config_file)]))
    assert config.learning_rate == 1e-4
    assert config.lr_schedule == {"name": "cosine_decay", "arguments": [1e-5, 100]}
    assert yaml.safe_load("a: 1e-4") == {"a": "1e-4"}, "the YAML readers of others changed"


def test_grad_checkpoint_dora_and_full(dense_model_dir, car_splits, tmp_path, capsys):
    """Gradient checkpointing (on the plain path; the padded one goes a layer at a time) changes
    no numbers; DoRA and full fine-tuning train and reload. Output that is not a terminal gets a
    line per step between the reports."""
    train_set, valid_set, vocab_size = car_splits
    x = probe(vocab_size)

    def run(name: str, fast_paths: FastPaths | None = None, **options):
        model = load_model(dense_model_dir)
        if fast_paths is not None:
            set_fast_paths(model, fast_paths)
        config = LoRAConfig(**{**TRAIN_OPTIONS, "iters": 2, "adapter_path": str(tmp_path / name)})
        train(model, train_set, None, dataclasses.replace(config, **options))
        model.eval()
        return model, mx.load(str(tmp_path / name / "adapters.safetensors"))

    _, plain = run("plain")
    out = capsys.readouterr().out
    assert "Iter 1/2: Step loss" in out and "Iter 2: Train loss" in out
    assert "Iter 2/2: Step loss" not in out  # iteration 2 has its report
    checkpointed, recomputed = run("checkpointed", FastPaths.off(), grad_checkpoint=True)
    assert type(checkpointed.layers[0]).__name__.startswith("Checkpointed")
    assert type(load_model(dense_model_dir).layers[0]).__name__ == "HunYuanMoEV1DecoderLayer"
    for name, value in plain.items():
        assert mx.allclose(recomputed[name], value, atol=1e-5), name

    with pytest.raises(ValueError, match="DoRA is not supported on the routed experts"):
        run("dora-experts", fine_tune_type="dora")
    for name, options in {
        "dora": dict(fine_tune_type="dora", lora_targets=["attention", "shared_mlp"]),
        "full": dict(fine_tune_type="full", num_layers=1),
    }.items():
        model, weights = run(name, **options)
        reloaded, _ = load(dense_model_dir, adapter_path=tmp_path / name)
        assert mx.allclose(reloaded(x), model(x), atol=1e-6)
        fused = fuse(dense_model_dir, tmp_path / name, tmp_path / f"{name}-fused")
        assert mx.allclose(load_model(fused)(x), model(x), atol=1e-4, rtol=0)
    assert all(key.startswith("model.layers.1.") for key in weights)
    assert "model.layers.1.mlp.experts.gate_up_proj.weight" in weights


def test_car_scoring():
    assert (
        evaluate_car.extract_answer("<think>\n\n</think>\n<answer>\n奥迪q5l；宝马x5\n</answer>")
        == "奥迪q5l；宝马x5"
    )
    assert evaluate_car.extract_answer("<answer>\nds525") == "ds525"
    assert evaluate_car.extract_answer("<think>x</think>无") == "无"
    scores = evaluate_car.score(
        ["奥迪q5l；宝马x5", "无", "ds525", "无"], ["宝马x5；奥迪q5l", "无", "ds5", "cr-v"]
    )
    assert scores["exact_match"] == 0.5
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, so that tqdm draws its bar."""

    def isatty(self) -> bool:
        return True


def test_evaluate_car_command(full_vocab_model_dir, tmp_path, capsys, monkeypatch):
    test_file = shared_dir() / "car" / "test.json"
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    scores = evaluate_car.main(
        [
            "--model",
            str(full_vocab_model_dir),
            "--data",
            str(test_file),
            "--limit",
            "2",
            "--max-tokens",
            "3",
            "--output",
            str(tmp_path / "out.jsonl"),
        ]
    )
    assert scores["examples"] == 2 and 0 <= scores["f1"] <= 1
    assert "Scoring: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [{"input", "label", "prediction"}] * 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == scores
    (tmp_path / "bad.json").write_text('{"input": "x", "label": "y"}\n{"input": "x"}\n')
    with pytest.raises(ValueError, match="bad.json, line 2"):
        evaluate_car.read_test_set(tmp_path / "bad.json")


def test_adapters_under_inference_fast_paths(trained, car_splits):
    """Prefill of many rows and cached single-token steps give the adapted model's own logits."""
    model, _, _ = trained
    tokens = mx.array(np.random.default_rng(1).integers(0, car_splits[2], (1, 300)))

    def prefill_and_step():
        cache = model.make_cache()
        return model(tokens[:, :-1], cache), model(tokens[:, -1:], cache)

    fast = prefill_and_step()
    with using(model, FastPaths.off()):
        plain = prefill_and_step()
    for a, b in zip(fast, plain):
        assert mx.allclose(a, b, atol=1e-4, rtol=0)


class InterruptAt(Recorder):
    """Sends this process `signum` when training reports iteration `iteration`."""

    def __init__(self, iteration: int, signum: int) -> None:
        super().__init__()
        self.iteration, self.signum = iteration, signum

    def on_train_loss_report(self, train_info: dict) -> None:
        super().on_train_loss_report(train_info)
        if train_info["iteration"] == self.iteration:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_adapters_and_optimizer_then_resumes(
    dense_model_dir, car_splits, tmp_path, signum
):
    """Ctrl-C (or SIGTERM) mid-run: the step finishes, adapters and optimizer state are saved
    where --resume-adapter-file takes them, and the run goes on from there as if uninterrupted."""
    train_set, valid_set, _ = car_splits
    options = {**TRAIN_OPTIONS, "save_every": 100, "steps_per_eval": 100}
    config = LoRAConfig(iters=8, adapter_path=str(tmp_path / "a"), **options)
    with pytest.raises(KeyboardInterrupt) as info:
        train(load_model(dense_model_dir), train_set, valid_set, config, InterruptAt(5, signum))
    assert info.value.exit_status == 128 + signum
    checkpoint = tmp_path / "a" / "0000005_adapters.safetensors"
    assert checkpoint.is_file() and optimizer_file(checkpoint).is_file()
    resumed = dataclasses.replace(
        config, adapter_path=str(tmp_path / "b"), resume_adapter_file=str(checkpoint)
    )
    train(load_model(dense_model_dir), train_set, valid_set, resumed)
    straight = dataclasses.replace(config, adapter_path=str(tmp_path / "c"))
    train(load_model(dense_model_dir), train_set, valid_set, straight)
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    for name, value in mx.load(str(tmp_path / "c" / "adapters.safetensors")).items():
        assert mx.allclose(b[name], value, atol=1e-6), name


def test_adapters_meet_another_model(trained, dense_model_dir):
    """Adapters say which model they were made for when applied to a different one."""
    _, adapter_path, _ = trained
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    assert config["num_layers"] == 2  # resolved, not -1
    other = HunYuanMoEV1Config.from_pretrained(dense_model_dir)
    other.num_hidden_layers = 4
    with pytest.raises(ValueError, match=r"trained on another model \(.*num_hidden_layers 2"):
        load_adapters(HunYuanMoEV1ForCausalLM(other), adapter_path)
    with pytest.raises(ValueError, match="use --num-layers 2, or -1 for all"):
        prepare_model(load_model(dense_model_dir), "lora", 16)


def test_fuse_refuses_a_non_empty_destination_and_leaves_no_stale_shards(
    trained, dense_model_dir, tmp_path
):
    _, adapter_path, _ = trained
    out = tmp_path / "fused"
    out.mkdir()
    stale = out / "model-00003-of-00003.safetensors"
    stale.write_bytes(b"old")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        fuse(dense_model_dir, adapter_path, out)
    assert stale.is_file()
    fuse(dense_model_dir, adapter_path, out, force=True)
    assert not stale.exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]


def test_cli_bad_data_line_is_one_line(full_vocab_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(SystemExit) as exit_info:
        lora_main(["--model", str(full_vocab_model_dir), "--train", "--data", str(data)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert f"{data / 'train.jsonl'}, line 2: not valid JSON" in err


def test_optimizer_choice_accumulation_and_metrics_file(dense_model_dir, car_splits, tmp_path):
    """AdamW with its settings, two batches per optimizer step, every report in metrics.jsonl."""
    train_set, valid_set, _ = car_splits
    options = {**TRAIN_OPTIONS, "save_every": 4, "steps_per_eval": 4, "steps_per_report": 2}
    config = LoRAConfig(
        iters=8,
        adapter_path=str(tmp_path / "a"),
        optimizer="adamw",
        optimizer_config={"adamw": {"weight_decay": 0.1}},
        grad_accumulation_steps=2,
        report_to="jsonl",
        **options,
    )
    recorder = Recorder()
    train(load_model(dense_model_dir), train_set, valid_set, config, recorder)
    state, metadata = mx.load(str(tmp_path / "a" / "optimizer.safetensors"), return_metadata=True)
    assert state["step"].item() == 4 and metadata["optimizer"] == "AdamW"  # 8 batches, 2 a step
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lines == recorder.events
    with pytest.raises(ValueError, match="holds the state of AdamW, not of Adam"):
        resumed = dataclasses.replace(
            config,
            optimizer="adam",
            optimizer_config={},
            adapter_path=str(tmp_path / "b"),
            resume_adapter_file=str(tmp_path / "a" / "0000004_adapters.safetensors"),
        )
        train(load_model(dense_model_dir), train_set, valid_set, resumed)
    for bad, message in (
        (dict(grad_accumulation_steps=3), "must be at least 1 and divide save_every"),
        (dict(optimizer="lbfgs"), "Unknown optimizer 'lbfgs'"),
        (dict(optimizer_config={"adamw": {"betas": 0.9}}), "optimizer_config for adamw"),
        (dict(report_to="wandb"), "nothing here reaches the network"),
    ):
        with pytest.raises(ValueError, match=message):
            bad_config = dataclasses.replace(config, **bad)
            train(load_model(dense_model_dir), train_set, valid_set, bad_config)



def test_every_number_of_a_run_repeats_with_its_seed(full_vocab_model_dir, tmp_path, capsys):
    """The first validation loss too, whatever numpy's global generator held before the run
    (issue 25 item 5): one validation batch out of four, of examples of different lengths."""
    data = tmp_path / "data"
    data.mkdir()
    records = [{"text": "奥迪" * (i + 1)} for i in range(8)]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = ["--model", str(full_vocab_model_dir), "--train", "--data", str(data)]
    flags += ["--num-layers", "1", "--iters", "2", "--batch-size", "2", "--val-batches", "1"]
    flags += ["--steps-per-eval", "1"]
    logs = []
    for before in (1, 2):  # two global states that draw different first batches
        np.random.seed(before)
        lora_main([*flags, "--adapter-path", str(tmp_path / f"adapters{before}")])
        out = capsys.readouterr().out
        logs.append([line.split(", ")[0] for line in out.splitlines() if "loss" in line])
    assert logs[0][0].startswith("Iter 0: Val loss") and len(logs[0]) == 5
    assert logs[0] == logs[1]


def test_a_warning_is_one_plain_line(full_vocab_model_dir, tmp_path, capsys):
    """Training without valid.jsonl warns in one line, as errors are reported, without the
    warning's source file and line (issue 25 item 12)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n')
    lora_main(
        ["--model", str(full_vocab_model_dir), "--train", "--data", str(data), "--iters", "1",
         "--batch-size", "1", "--num-layers", "1", "--adapter-path", str(tmp_path / "adapters")]
    )  # fmt: skip
    assert capsys.readouterr().err == (
        "python -m hunyuan_mlx.lora: warning: No valid.jsonl: training without validation\n"
    )
