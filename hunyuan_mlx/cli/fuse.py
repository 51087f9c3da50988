"""Fuse trained adapters into a model: `python -m hunyuan_mlx.fuse --model M --adapter-path A`."""

from __future__ import annotations

import argparse

from ..tuner.fuse import DEFAULT_ADAPTER_PATH, DEFAULT_SAVE_PATH, fuse
from . import run_main
from .options import add_debug_argument, add_force_argument, command_parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The fuse command's flags (mlx_lm.fuse's names)."""
    parser = command_parser("fuse", prog, "Fuse trained adapters into a HunYuan model.")
    parser.add_argument("--model", required=True, help="Local model directory or Hub repo id.")
    parser.add_argument(
        "--adapter-path",
        default=DEFAULT_ADAPTER_PATH,
        help="Directory with adapters.safetensors and adapter_config.json (default: %(default)s).",
    )
    parser.add_argument(
        "--save-path", default=DEFAULT_SAVE_PATH, help="Output directory (default: %(default)s)."
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="Write unquantized weights (from a quantized base): exactly base + adapters. "
        "Without it a quantized base is re-quantized after folding, so the fused text can differ "
        "(see docs/fine-tuning.md#fuse for the measured KL). Default: off",
    )
    add_force_argument(parser)
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """CLI entry point: fuse and save."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        out = fuse(args.model, args.adapter_path, args.save_path, args.dequantize, args.force)
    print(f"Saved the fused model to {out}")
