"""Convert a checkpoint to MLX: `python -m hunyuan_mlx.convert --hf-path SRC --mlx-path DST -q`.

Flag names are mlx_lm.convert's where it has the flag; the work is `hunyuan_mlx.converter`.
"""

from __future__ import annotations

import argparse

from ..converter import (
    DEFAULT_MLX_PATH,
    DTYPES,
    ConversionOptions,
    convert,
)
from ..models.quantization import MLX_LM_RECIPES, Q_MODE_DEFAULTS, QUANT_RECIPES
from . import run_main
from .options import add_debug_argument, add_force_argument, command_parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line, with mlx_lm.convert's flag names where it has the flag."""
    d = ConversionOptions()
    parser = command_parser(
        "convert",
        prog,
        "Convert a HunYuan MoE V1 checkpoint to MLX (streaming, optionally quantized).",
    )
    parser.add_argument(
        "--hf-path", "--model", required=True, help="Source: local directory or Hub repo id."
    )
    parser.add_argument(
        "--mlx-path", default=DEFAULT_MLX_PATH, help="Output directory (default: %(default)s)."
    )
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    parser.add_argument(
        "--q-bits", type=int, default=None, help="Bits per weight (default: the mode's, 4)."
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        default=None,
        help="Quantization group size (default: the mode's, 64 for affine).",
    )
    parser.add_argument(
        "--q-mode",
        default=d.q_mode,
        choices=list(Q_MODE_DEFAULTS),
        help="Quantization mode (default: %(default)s).",
    )
    parser.add_argument(
        "--quant-recipe",
        "--quant-predicate",
        default=d.quant_recipe,
        # mlx-lm's recipe names get past argparse, to be refused with the nearest of ours.
        choices=[*QUANT_RECIPES, *MLX_LM_RECIPES],
        metavar="{" + ",".join(QUANT_RECIPES) + "}",
        help="uniform: every module at --q-bits; mixed_N: routed experts at --q-bits, attention, "
        "shared expert and embedding/head at N bits (--quant-predicate: mlx-lm's name; "
        "default: %(default)s).",
    )
    parser.add_argument(
        "--dtype",
        default=d.dtype,
        choices=DTYPES,
        help="Type of the unquantized weights and of quantization scales (default: %(default)s).",
    )
    parser.add_argument(
        "--max-shard-size",
        default=d.max_shard_size,
        help="Largest output shard, e.g. 5GB, 500MB (default: %(default)s).",
    )
    parser.add_argument(
        "-d", "--dequantize", action="store_true", help="Dequantize a quantized MLX checkpoint."
    )
    parser.add_argument("--upload-repo", default=None, help="Hub repo to upload the result to.")
    add_force_argument(parser)
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: convert, then print the summary."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    with run_main(parser.prog, args.pop("debug")):
        convert(**args)
