"""The fine-tuning loop (LoRA, DoRA or full) and its options, `LoRAConfig`.

Options and defaults follow `mlx_lm.lora`, plus `lora_targets` (which modules get adapters, the
routed experts included), `lora_alpha` and a named `lr_schedule`. Batching and evaluation are
mlx-lm's. The loop is this module's own because
mlx-lm's always starts at iteration 1 and saves no optimizer state: here every checkpoint
`NNNNNNN_adapters.safetensors` has an `NNNNNNN_optimizer.safetensors` beside it (Adam moments and
step, iteration in its metadata), and `--resume-adapter-file` continues the same run from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import evaluate, iterate_batches
from mlx_lm.tuner.utils import build_schedule, print_trainable_parameters

from ..interrupts import deferred
from ..loading import DEFAULT_LOAD_DTYPE, load
from ..models.hf_compat import masked_cross_entropy
from .adapters import (
    ADAPTER_FILE,
    DEFAULT_LORA_PARAMETERS,
    DEFAULT_LORA_TARGETS,
    adapter_weights,
    base_model_signature,
    load_adapter_weights,
    load_adapters,
    prepare_model,
    resolve_targets,
    save_adapter_config,
)
from .data import load_data_dir, split_batch
from .layerwise import layerwise_loss_and_grad, takes_layerwise

OPTIMIZER_FILE = "optimizer.safetensors"
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS: dict[str, type[optim.Optimizer]] = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}
REPORT_TO = ("jsonl",)
METRICS_FILE = "metrics.jsonl"


@dataclass
class LoRAConfig:
    """Every option of a fine-tuning run; the CLI flags and YAML keys are these field names."""

    model: str | None = None
    train: bool = False
    test: bool = False
    data: str = "data"
    fine_tune_type: str = "lora"
    num_layers: int = 16
    lora_rank: int = DEFAULT_LORA_PARAMETERS["rank"]
    lora_alpha: float | None = None  # when set, the scale is alpha / rank
    lora_scale: float = DEFAULT_LORA_PARAMETERS["scale"]
    lora_dropout: float = DEFAULT_LORA_PARAMETERS["dropout"]
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    batch_size: int = 4
    iters: int = 1000
    learning_rate: float = 1e-5
    # "constant", "cosine", or mlx-lm's schedule dict ({name, arguments, warmup}) from YAML.
    lr_schedule: str | dict[str, Any] = "constant"
    warmup: int = 0
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    mask_prompt: bool | None = None  # None: on for chat and prompt/completion data
    val_batches: int = 25
    test_batches: int = 500
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    adapter_path: str = "adapters"
    resume_adapter_file: str | None = None
    seed: int = 0
    optimizer: str = "adam"
    # Per-optimizer keyword arguments, as mlx-lm's YAML: {"adamw": {"weight_decay": 0.01}}.
    optimizer_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    grad_accumulation_steps: int = 1  # batches whose gradients add up to one optimizer step
    report_to: str | None = None  # "jsonl": metrics.jsonl in the adapter path (no network)
    dtype: str = DEFAULT_LOAD_DTYPE  # the frozen base's compute type (`loading.LOAD_DTYPES`)
    fast_paths: str = "auto"  # the model's policy (`FastPaths.named`)

    def __post_init__(self) -> None:
        """Refuse what can be refused before the minutes of loading a model."""
        accumulation = self.grad_accumulation_steps
        if accumulation < 1 or self.save_every % accumulation:
            raise ValueError(
                f"grad_accumulation_steps ({accumulation}) must be at least 1 and divide "
                f"save_every ({self.save_every}): a checkpoint holds no partial gradients"
            )
        if self.report_to is not None and self.report_to not in REPORT_TO:
            raise ValueError(
                f"report_to {self.report_to!r} is not supported; choose from "
                f"{', '.join(REPORT_TO)} (nothing here reaches the network)"
            )
        unknown = sorted({self.optimizer.lower(), *self.optimizer_config} - OPTIMIZERS.keys())
        if unknown:
            raise ValueError(
                f"Unknown optimizer {unknown[0]!r}; choose from {', '.join(OPTIMIZERS)}"
            )


def lora_parameters(config: LoRAConfig) -> dict[str, Any]:
    """The `lora_parameters` block of adapter_config.json: rank, scale, dropout, module keys."""
    scale = config.lora_scale if config.lora_alpha is None else config.lora_alpha / config.lora_rank
    return {
        "rank": config.lora_rank,
        "scale": scale,
        "dropout": config.lora_dropout,
        "keys": resolve_targets(config.lora_targets),
    }


def learning_rate_schedule(config: LoRAConfig) -> float | Callable[[mx.array], mx.array]:
    """The learning rate: constant or cosine decay to 0 at `iters`, after a linear warm-up."""
    schedule, lr = config.lr_schedule, config.learning_rate
    if isinstance(schedule, dict):
        return build_schedule(schedule)
    if schedule == "constant":
        if not config.warmup:
            return lr
        spec = {"name": "linear_schedule", "arguments": [lr, lr, 1]}
    elif schedule == "cosine":
        spec = {"name": "cosine_decay", "arguments": [lr, max(config.iters - config.warmup, 1)]}
    else:
        raise ValueError(f"Unknown lr schedule {schedule!r}; choose from {LR_SCHEDULES}")
    return build_schedule({**spec, "warmup": config.warmup})


def build_optimizer(config: LoRAConfig) -> optim.Optimizer:
    """`config.optimizer` with the learning-rate schedule and its `optimizer_config` entry."""
    name = config.optimizer.lower()
    try:
        return OPTIMIZERS[name](
            learning_rate=learning_rate_schedule(config), **config.optimizer_config.get(name, {})
        )
    except TypeError as e:
        raise ValueError(f"optimizer_config for {name}: {e}") from None


class MetricsFile(TrainingCallback):
    """Appends every report as one JSON line to a local file, then passes it on."""

    def __init__(self, path: Path, then: TrainingCallback | None = None) -> None:
        self.path, self.then = path, then

    def _write(self, info: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        self._write(train_info)
        if self.then is not None:
            self.then.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        self._write(val_info)
        if self.then is not None:
            self.then.on_val_loss_report(val_info)


def masked_loss(model: nn.Module, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    """Mean float32 cross-entropy over tokens `offset <= i < length` of each row, and their count.

    mlx-lm's `default_loss` (0.32) also counts position `length`, the first padding token.
    """
    inputs, targets, mask = split_batch(batch, lengths)
    return masked_cross_entropy(model(inputs), targets, mask)


def optimizer_file(adapter_file: str | Path) -> Path:
    """The optimizer checkpoint that goes with an adapter file."""
    adapter_file = Path(adapter_file)
    name = adapter_file.name
    prefix = name[: -len(ADAPTER_FILE)] if name.endswith(ADAPTER_FILE) else adapter_file.stem + "_"
    return adapter_file.with_name(prefix + OPTIMIZER_FILE)


def save_checkpoint(
    model: nn.Module,
    optimizer: optim.Optimizer,
    adapter_file: Path,
    iteration: int,
    trained_tokens: int,
) -> None:
    """Write the adapters and, beside them, the optimizer state, iteration and tokens trained."""
    mx.save_safetensors(str(adapter_file), adapter_weights(model))
    mx.save_safetensors(
        str(optimizer_file(adapter_file)),
        dict(tree_flatten(optimizer.state)),
        metadata={
            "iteration": str(iteration),
            "trained_tokens": str(trained_tokens),
            "optimizer": type(optimizer).__name__,
        },
    )


def resume(
    model: nn.Module, optimizer: optim.Optimizer, adapter_file: str | Path
) -> tuple[int, int]:
    """Load a checkpoint into a prepared model and optimizer; returns the iteration reached and
    the tokens trained so far.

    Without an optimizer file beside the adapters (e.g. mlx-lm's) only the weights are loaded and
    training starts again at iteration 0 with a fresh optimizer.
    """
    load_adapter_weights(model, adapter_file)
    state_file = optimizer_file(adapter_file)
    if not state_file.is_file():
        warnings.warn(
            f"No {state_file.name} beside {adapter_file}: resuming the weights only, from "
            "iteration 0 with a fresh optimizer",
            stacklevel=2,
        )
        return 0, 0
    state, metadata = mx.load(str(state_file), return_metadata=True)
    saved = metadata.get("optimizer", type(optimizer).__name__)
    if saved != type(optimizer).__name__:
        raise ValueError(
            f"{state_file} holds the state of {saved}, not of {type(optimizer).__name__}: "
            "resume with the same --optimizer"
        )
    optimizer.state = tree_unflatten(list(state.items()))
    return int(metadata["iteration"]), int(metadata.get("trained_tokens", 0))


@cache
def checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of a layer class whose call recomputes its activations in the backward pass.

    mlx-lm's `grad_checkpoint` patches the class itself, which would reach every model in the
    process (a benchmark comparing both, the tests); swapping one instance's class does not.
    """
    if getattr(cls, "checkpointed", False):
        return cls

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        def inner(params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self.update(params)
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "checkpointed": True})


def checkpoint_layers(model: nn.Module) -> None:
    """Gradient checkpointing of every decoder layer of this model; none where it trains a layer
    at a time (`layerwise.py`), which recomputes each layer already."""
    if takes_layerwise(model):
        return
    for layer in model.layers:
        layer.__class__ = checkpointed_class(type(layer))


def report(callback: TrainingCallback | None, info: dict[str, Any]) -> None:
    """Print one line of training or validation metrics and pass them to the callback."""
    if "val_loss" in info:
        print(
            f"Iter {info['iteration']}: Val loss {info['val_loss']:.3f}, "
            f"Val took {info['val_time']:.3f}s",
            flush=True,
        )
        if callback is not None:
            callback.on_val_loss_report(info)
        return
    print(
        f"Iter {info['iteration']}: Train loss {info['train_loss']:.3f}, "
        f"Learning Rate {info['learning_rate']:.3e}, It/sec {info['iterations_per_second']:.3f}, "
        f"Tokens/sec {info['tokens_per_second']:.3f}, Trained Tokens {info['trained_tokens']}, "
        f"Peak mem {info['peak_memory']:.3f} GB",
        flush=True,
    )
    if callback is not None:
        callback.on_train_loss_report(info)


def validate(model: nn.Module, dataset: list, config: LoRAConfig, num_batches: int) -> float:
    """Mean loss per answer token over `num_batches` batches (-1: all), as mlx-lm evaluates;
    the batches are drawn from `config.seed`, the same at every validation of a run and in every
    run with that seed."""
    # mlx-lm's batching draws from numpy's global generator: seed it (the first validation comes
    # before the training batches seed it), then keep the training order unchanged.
    rng_state = np.random.get_state()
    np.random.seed(config.seed)
    loss = evaluate(
        model, dataset, config.batch_size, num_batches, config.max_seq_length, loss=masked_loss
    )
    np.random.set_state(rng_state)
    return loss


def training_step(
    model: nn.Module, optimizer: optim.Optimizer, accumulation_steps: int = 1
) -> tuple[Callable[..., tuple[mx.array, mx.array, Any]], list[Any]]:
    """A step on `(batch, lengths, gradients so far, update)`: the loss, token count and
    gradients added to those so far; with `update`, the optimizer applies their mean over the
    `accumulation_steps` batches instead, and no gradients are returned. Also returns the state the
    step updates (evaluate it after each step).

    Where the model's fast paths read routing counts on the host (the padded experts), the step
    goes a layer at a time (`layerwise.py`) and is not compiled: under `mx.compile` the experts
    would fall back to the gathered ones, which train several times slower on CUDA (BENCHMARKS.md).
    Elsewhere it is mlx-lm's: one `value_and_grad`, compiled.
    """
    layerwise = takes_layerwise(model)
    loss_and_grad = layerwise_loss_and_grad if layerwise else nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch: mx.array, lengths: mx.array, so_far: Any, update: bool) -> tuple:
        (loss, tokens), grads = loss_and_grad(model, batch, lengths)
        if so_far is not None:
            grads = tree_map(mx.add, grads, so_far)
        if update:
            if accumulation_steps > 1:
                grads = tree_map(lambda g: g / accumulation_steps, grads)
            optimizer.update(model, grads)
            grads = None
        return loss, tokens, grads

    if layerwise:
        return step, state
    return mx.compile(step, inputs=state, outputs=state), state


def train(
    model: nn.Module,
    train_set: list,
    valid_set: list | None,
    config: LoRAConfig,
    callback: TrainingCallback | None = None,
) -> None:
    """Fine-tune `model` in place as `config` says, saving to `config.adapter_path`.

    `train_set` / `valid_set` are `(tokens, offset)` examples (`hunyuan_mlx.data`).
    """
    mx.random.seed(config.seed)
    layers = prepare_model(model, config.fine_tune_type, config.num_layers, lora_parameters(config))
    accumulation = config.grad_accumulation_steps
    optimizer = build_optimizer(config)
    start, trained_tokens = 0, 0
    if config.resume_adapter_file:
        start, trained_tokens = resume(model, optimizer, config.resume_adapter_file)
    if start >= config.iters:
        raise ValueError(f"The checkpoint is at iteration {start}; raise --iters to go on")
    print_trainable_parameters(model)
    print(f"Fast paths: {model.fast_paths.describe()}", flush=True)
    adapter_path = Path(config.adapter_path)
    save_adapter_config(
        {
            **dataclasses.asdict(config),
            "num_layers": layers,  # resolved: -1 would not say which model they fit
            "lora_parameters": lora_parameters(config),
            "base_model": base_model_signature(model),
        },
        adapter_path,
    )
    if config.grad_checkpoint:
        checkpoint_layers(model)

    if config.report_to == "jsonl":
        callback = MetricsFile(adapter_path / METRICS_FILE, callback)
    step, state = training_step(model, optimizer, accumulation)
    batches: Iterator = iterate_batches(
        train_set, config.batch_size, config.max_seq_length, loop=True, seed=config.seed
    )
    # Replay the data order of an uninterrupted run.
    for _ in range(start):
        next(batches)

    def validate_at(iteration: int) -> None:
        tic = time.perf_counter()
        val_loss = validate(model, valid_set, config, config.val_batches)
        model.train()
        val_time = time.perf_counter() - tic
        report(callback, {"iteration": iteration, "val_loss": val_loss, "val_time": val_time})

    model.train()
    if valid_set:
        validate_at(start)
    losses, tokens, steps, elapsed, grads = 0.0, 0, 0, 0.0, None
    # Ctrl-C, SIGTERM or SIGHUP: finish the step, save, then stop (a second one stops at once).
    with deferred() as interrupt:
        for it in range(start + 1, config.iters + 1):
            tic = time.perf_counter()
            loss, ntokens, grads = step(*next(batches), grads, it % accumulation == 0)
            mx.eval(state, loss, ntokens, grads)
            took = time.perf_counter() - tic
            elapsed += took
            losses += loss.item()
            tokens += ntokens.item()
            trained_tokens += ntokens.item()
            steps += 1

            if it % config.steps_per_report == 0 or it == config.iters:
                report(
                    callback,
                    {
                        "iteration": it,
                        "train_loss": losses / steps,
                        "learning_rate": optimizer.learning_rate.item(),
                        "iterations_per_second": steps / elapsed,
                        "tokens_per_second": tokens / elapsed,
                        "trained_tokens": trained_tokens,
                        "peak_memory": mx.get_peak_memory() / 1e9,
                    },
                )
                losses, tokens, steps, elapsed = 0.0, 0, 0, 0.0
            elif not sys.stdout.isatty():
                # A piped run's log moves every step, not only every steps_per_report.
                print(
                    f"Iter {it}/{config.iters}: Step loss {loss.item():.3f}, Took {took:.3f}s",
                    flush=True,
                )
            # Validated where checkpoints are written, so the last adapters are validated too.
            if valid_set and (it % config.steps_per_eval == 0 or it == config.iters):
                validate_at(it)
            # Stops where an optimizer step ends, so that no partial gradients are lost.
            interrupted = interrupt.signum is not None and it < config.iters
            interrupted = interrupted and it % accumulation == 0
            if it % config.save_every == 0 or interrupted:
                checkpoint = adapter_path / f"{it:07d}_{ADAPTER_FILE}"
                save_checkpoint(model, optimizer, checkpoint, it, trained_tokens)
                save_checkpoint(model, optimizer, adapter_path / ADAPTER_FILE, it, trained_tokens)
                print(f"Iter {it}: Saved adapter weights to {checkpoint}", flush=True)
            if interrupted:
                print(f"Interrupted: go on with --resume-adapter-file {checkpoint}", flush=True)
                interrupt.raise_if_requested()
    save_checkpoint(model, optimizer, adapter_path / ADAPTER_FILE, config.iters, trained_tokens)
    print(f"Saved final weights to {adapter_path / ADAPTER_FILE}", flush=True)


def run(config: LoRAConfig, callback: TrainingCallback | None = None) -> None:
    """Load the model and data, then train and/or report the test loss."""
    if config.model is None:
        raise ValueError("--model is required")
    if not (config.train or config.test):
        raise ValueError("Pass --train and/or --test")
    model, tokenizer = load(config.model, dtype=config.dtype, fast_paths=config.fast_paths)
    data = load_data_dir(config.data, tokenizer, config.max_seq_length, config.mask_prompt)
    if config.train:
        if not data.get("train"):
            raise ValueError(f"No training data: {config.data}/train.jsonl is missing or empty")
        if not data.get("valid"):
            warnings.warn("No valid.jsonl: training without validation", stacklevel=2)
        train(model, data["train"], data.get("valid"), config, callback)
    elif Path(config.adapter_path, ADAPTER_FILE).is_file():
        load_adapters(model, config.adapter_path)
    if config.test:
        if not data.get("test"):
            raise ValueError(f"No test data: {config.data}/test.jsonl is missing or empty")
        loss = validate(model, data["test"], config, config.test_batches)
        print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.", flush=True)


