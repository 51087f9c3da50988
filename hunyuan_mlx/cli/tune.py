"""Measure the experts' kernels and decode's step on this machine and cache what the fast paths
use: `python -m hunyuan_mlx.tune` (see `models/probe.py` for why this runs only when asked)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import mlx.core as mx

from ..loading import compute_dtype
from ..models import thresholds
from ..models.probe import DecodeProbeShape, ProbeShape, tune
from ..models.quantization import DEFAULT_Q_MODE, quant_params
from . import run_main
from .options import add_debug_argument, command_parser, positive_int

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def model_dtype() -> mx.Dtype:
    """What a loaded model computes in here: float32 on the CPU, else the release's bfloat16."""
    return compute_dtype() or mx.bfloat16


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The tune command's flags."""
    parser = command_parser(
        "tune",
        prog,
        "Measure gathered experts against padded ones and every expert on every token here, and "
        "decode a layer at a time against the whole model as one graph; cache the choices.",
    )
    here = str(model_dtype()).removeprefix("mlx.core.")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=DTYPES,
        default=[here],
        help=f"Rows' dtypes to probe (default here: {here}, what a loaded model computes in).",
    )
    quantization = quant_params(None, None, DEFAULT_Q_MODE)  # the converter's defaults
    parser.add_argument(
        "--bits",
        nargs="+",
        type=int,
        default=[quantization["bits"]],
        help="Experts' bits (default: %(default)s).",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=quantization["group_size"],
        help="Quantization group size (default: %(default)s).",
    )
    add_debug_argument(parser)
    shapes = (
        (ProbeShape.here(), "", "Probed experts' shape"),
        (DecodeProbeShape(), "decode-", "The decode probe's model"),
    )
    for shape, prefix, what in shapes:
        for field in dataclasses.fields(shape):
            if field.name != "top_k":  # A13B's
                help_ = f"{what} (default here: %(default)s)."
                flag = f"--{prefix}{field.name}"
                default = getattr(shape, field.name)
                parser.add_argument(flag, type=positive_int, default=default, help=help_)
    return parser


class Progress:
    """Prints each timing as the probes measure it, under its key's heading."""

    def __init__(self, decode_quant: str):
        self.decode_quant = decode_quant  # what the decode probe's model is quantized as
        self.key: str | None = None

    def label(self, key: str) -> str:
        """A probe's heading: its key, and the decode probe's quantization."""
        return f"{key} ({self.decode_quant})" if key == thresholds.DECODE_GRAPH else key

    def __call__(self, key: str, timing: tuple[int, float, float]) -> None:
        if key != self.key:
            self.key = key
            print(f"  {self.label(key)}:", flush=True)
        if key == thresholds.DECODE_GRAPH:
            round_, layer, graph = timing
            line = f"round {round_}: a layer at a time {layer:.2f} ms, one graph {graph:.2f} ms"
        else:
            rows, gathered, candidate = timing
            kernel = thresholds.kernel_of(key)
            line = f"{rows:>5} rows: gathered {gathered:.2f} ms, {kernel} {candidate:.2f} ms"
        print(f"    {line}", flush=True)


def check_quantization(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, naming the flags, bits and a group size MLX cannot quantize with, or a group size
    that a probed width is not a multiple of, before any probing."""
    for bits in args.bits:
        try:
            quant_params(bits, args.group_size, DEFAULT_Q_MODE)
        except ValueError as e:
            parser.error(f"--bits {bits} --group-size {args.group_size}: {e}")
    for name in ("hidden", "intermediate", "decode_hidden", "decode_intermediate"):
        width = getattr(args, name)
        if width % args.group_size:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} {width} is not a multiple of --group-size {args.group_size}")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: probe, cache, and print what was chosen."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_quantization(parser, args)
    with run_main(parser.prog, args.debug):
        shape = ProbeShape(args.experts, args.hidden, args.intermediate)
        decode_shape = DecodeProbeShape(
            *(getattr(args, f"decode_{f.name}") for f in dataclasses.fields(DecodeProbeShape))
        )
        decode_dtype = model_dtype()
        progress = Progress(thresholds.key(decode_dtype, args.bits[0], args.group_size))
        print(f"{thresholds.device_key()}:", flush=True)
        found = tune(
            [DTYPES[d] for d in args.dtype],
            [(bits, args.group_size) for bits in args.bits],
            shape=shape,
            decode_shape=decode_shape,
            decode_dtype=decode_dtype,
            report=progress,
        )
        print("chosen:")
        for key, (threshold, _) in found.items():
            if key == thresholds.DECODE_GRAPH:
                choice = "the whole model as one graph" if threshold else "a layer at a time"
            elif threshold is None:
                choice = "gathered always"
            else:
                choice = f"{thresholds.kernel_of(key)} from {threshold} rows"
            print(f"  {progress.label(key)}: {choice}")
        print(f"cached in {thresholds.cache_path()}")
