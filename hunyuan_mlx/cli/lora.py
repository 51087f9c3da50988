"""LoRA, DoRA or full fine-tuning: `python -m hunyuan_mlx.lora --model M --train --data DIR`.

Flags, defaults and the YAML config (`-c`) follow `mlx_lm.lora`; every flag is a `LoRAConfig`
field (`hunyuan_mlx.tuner.trainer`).
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from typing import Any

import yaml

from ..tuner.adapters import FINE_TUNE_TYPES, LORA_TARGETS
from ..tuner.trainer import (
    LR_SCHEDULES,
    METRICS_FILE,
    OPTIMIZERS,
    REPORT_TO,
    LoRAConfig,
    run,
)
from . import run_main
from .options import (
    add_debug_argument,
    add_dtype_argument,
    add_fast_paths_argument,
    command_parser,
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """CLI flags for every `LoRAConfig` field; unset flags stay None so YAML values can apply."""
    d = LoRAConfig()
    p = command_parser("lora", prog, "LoRA, DoRA or full fine-tuning of HunYuan MoE V1.")
    p.add_argument("--model", help="Local model directory or Hub repo id.")
    p.add_argument("--train", action="store_true", default=None, help="Train.")
    p.add_argument("--test", action="store_true", default=None, help="Report the test loss.")
    p.add_argument("--data", help=f"Directory with train/valid/test.jsonl (default: {d.data}).")
    p.add_argument(
        "--fine-tune-type",
        choices=FINE_TUNE_TYPES,
        help=f"What trains: adapters (lora, dora) or every weight (full) "
        f"(default: {d.fine_tune_type}).",
    )
    p.add_argument(
        "--num-layers", type=int, help=f"Last layers to tune, -1 all (default: {d.num_layers})."
    )
    p.add_argument("--lora-rank", type=int, help=f"Rank of the adapters (default: {d.lora_rank}).")
    p.add_argument("--lora-alpha", type=float, help="Sets the scale to alpha / rank.")
    p.add_argument(
        "--lora-scale", type=float, help=f"Scale of the adapters' output (default: {d.lora_scale})."
    )
    p.add_argument(
        "--lora-dropout",
        type=float,
        help=f"Dropout on the adapters' input (default: {d.lora_dropout}).",
    )
    p.add_argument(
        "--lora-targets",
        nargs="+",
        help=f"Groups ({', '.join(LORA_TARGETS)}) or layer-relative module paths "
        f"(default: {' '.join(d.lora_targets)}).",
    )
    p.add_argument("--batch-size", type=int, help=f"Examples per batch (default: {d.batch_size}).")
    p.add_argument("--iters", type=int, help=f"Total iterations (default: {d.iters}).")
    p.add_argument("--learning-rate", type=float, help=f"Adam's (default: {d.learning_rate}).")
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help=f"Learning rate schedule (default: {d.lr_schedule}).",
    )
    p.add_argument("--warmup", type=int, help=f"Linear warm-up iterations (default: {d.warmup}).")
    p.add_argument(
        "--max-seq-length",
        type=int,
        help=f"Longest example in tokens; longer ones are truncated (default: {d.max_seq_length}).",
    )
    p.add_argument(
        "--grad-checkpoint",
        action="store_true",
        default=None,
        help="Recompute layer activations in the backward pass: less memory, more time. Where "
        "the routed experts train padded (CUDA; the CPU in bfloat16) every step does so already.",
    )
    p.add_argument(
        "--mask-prompt",
        action=argparse.BooleanOptionalAction,
        help="Loss on the answer only (default: on for chat and prompt/completion data).",
    )
    p.add_argument("--val-batches", type=int, help=f"-1: all (default: {d.val_batches}).")
    p.add_argument("--test-batches", type=int, help=f"-1: all (default: {d.test_batches}).")
    every = [
        ("--steps-per-report", "training reports"),
        ("--steps-per-eval", "validations"),
        ("--save-every", "saved checkpoints"),
    ]
    for flag, what in every:
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=int, help=f"Iterations between {what} (default: {default}).")
    p.add_argument("--adapter-path", help=f"Output directory (default: {d.adapter_path}).")
    p.add_argument(
        "--resume-adapter-file", help="A checkpoint (…_adapters.safetensors) to continue from."
    )
    p.add_argument(
        "--seed", type=int, help=f"Seed of every random draw of the run (default: {d.seed})."
    )
    p.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        help=f"Optimizer; its settings: optimizer_config in the YAML config "
        f"(default: {d.optimizer}).",
    )
    p.add_argument(
        "--grad-accumulation-steps",
        type=int,
        help=f"Batches per optimizer step (default: {d.grad_accumulation_steps}).",
    )
    p.add_argument(
        "--report-to",
        choices=REPORT_TO,
        help=f"jsonl: every report as a line of {METRICS_FILE} in the adapter path.",
    )
    p.add_argument(
        "-c",
        "--config",
        help="YAML file whose keys are these options' names (or mlx-lm's lora_parameters block).",
    )
    add_dtype_argument(p, default=None)
    add_fast_paths_argument(p, default=None)
    add_debug_argument(p)
    return p


# mlx-lm's YAML `lora_parameters` block: its key -> the LoRAConfig field.
LORA_PARAMETER_FIELDS = {
    "rank": "lora_rank",
    "scale": "lora_scale",
    "dropout": "lora_dropout",
    "keys": "lora_targets",
}


def flatten_lora_parameters(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with an mlx-lm `lora_parameters: {rank, scale, dropout, keys}` block spread onto
    this project's fields; a field set both ways, or an unknown key in the block, is an error."""
    block = values.pop("lora_parameters", None) or {}
    if not isinstance(block, dict):
        raise ValueError(f"{source}: lora_parameters must be a mapping")
    unknown = sorted(block.keys() - LORA_PARAMETER_FIELDS.keys())
    if unknown:
        raise ValueError(
            f"{source}: unknown lora_parameters keys {', '.join(unknown)} "
            f"(known: {', '.join(LORA_PARAMETER_FIELDS)})"
        )
    for key, value in block.items():
        name = LORA_PARAMETER_FIELDS[key]
        if name in values:
            raise ValueError(f"{source}: both {name} and lora_parameters.{key} are set")
        values[name] = value
    return values


class ConfigLoader(yaml.SafeLoader):
    """YAML as mlx-lm's lora reads it: `1e-4` is a number (YAML 1.1 wants `1.0e-4`; PyYAML would
    read a string). A subclass, so that other YAML readers in the process are left as they are."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def read_config_file(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The YAML config's options, and the line of each (a `lora_parameters` key's under its
    field's name); a syntax error, or a file that is not a mapping, is one error naming the
    file and line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        node = yaml.compose(text, ConfigLoader)
        values = yaml.load(text, ConfigLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: expected a mapping of option names to values (`lora_rank: 8`), "
            f"got {TYPE_NAMES.get(type(values), type(values).__name__)}"
        )
    lines = {}
    for key, value in node.value:
        lines[key.value] = key.start_mark.line + 1
        if key.value == "lora_parameters" and isinstance(value, yaml.MappingNode):
            for inner, _ in value.value:
                name = LORA_PARAMETER_FIELDS.get(inner.value, inner.value)
                lines[name] = inner.start_mark.line + 1
    return values, lines


def matches(value: Any, hint: Any) -> bool:
    """Whether a YAML `value` is of a `LoRAConfig` field's type (an integer is a number too)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(matches(value, arm) for arm in typing.get_args(hint))
    kind = typing.get_origin(hint) or hint
    if kind is Any:
        return True
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    return isinstance(value, kind)


def describe(hint: Any) -> str:
    """A field's type in words: `int | None` is "an integer or null"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(map(describe, typing.get_args(hint)))
    kind = typing.get_origin(hint) or hint
    if kind is list:
        return f"a list of {describe(typing.get_args(hint)[0])[2:]}s"
    return TYPE_NAMES[kind]


def config_from_args(args: argparse.Namespace) -> LoRAConfig:
    """Command-line values over the YAML file's over the defaults."""
    values = vars(args).copy()
    yaml_file = values.pop("config")
    values.pop("debug")
    merged: dict[str, Any] = {}
    if yaml_file:
        merged, lines = read_config_file(yaml_file)
        merged = flatten_lora_parameters(merged, yaml_file)
        hints = typing.get_type_hints(LoRAConfig)
        unknown = sorted(map(str, merged.keys() - hints.keys()))
        if unknown:
            raise ValueError(f"{yaml_file}: unknown keys {', '.join(unknown)}")
        for key, value in merged.items():
            if not matches(value, hints[key]):
                raise ValueError(
                    f"{yaml_file}, line {lines[key]}: {key}: expected {describe(hints[key])}, "
                    f"got {value!r}"
                )
    merged.update({k: v for k, v in values.items() if v is not None})
    return LoRAConfig(**merged)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: train and/or test as the flags and YAML config say."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        run(config_from_args(args))
