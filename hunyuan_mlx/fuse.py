"""Fold trained adapters into the weights: `python -m hunyuan_mlx.fuse --model M --adapter-path A`.

The result is a standalone checkpoint that `load_model` reads: this project's tensor names,
config.json with the base's `quantization` block (fused layers are re-quantized with their own
group size, bits and mode) or none with `--dequantize`, and the base's tokenizer files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import save_model

from .adapters import fuse_adapters
from .config import HunYuanMoEV1Config
from .loading import INDEX_FILE, load_model, resolve_model_path

# mlx-lm's defaults.
DEFAULT_ADAPTER_PATH = "adapters"
DEFAULT_SAVE_PATH = "fused_model"


def save_checkpoint(
    model: nn.Module, config: HunYuanMoEV1Config, source: Path, save_path: str | Path
) -> Path:
    """Write `model` with `config`, plus every side file of `source` (tokenizer, generation)."""
    save_path = Path(save_path)
    if save_path.resolve() == source.resolve():
        raise ValueError("The save path must differ from the model path")
    save_model(save_path, model)
    config.save_pretrained(save_path)
    for file in source.iterdir():
        if (
            file.is_file()
            and file.suffix != ".safetensors"
            and file.name
            not in (
                "config.json",
                INDEX_FILE,
            )
        ):
            shutil.copyfile(file, save_path / file.name)
    return save_path


def fuse(
    model: str | Path,
    adapter_path: str | Path = DEFAULT_ADAPTER_PATH,
    save_path: str | Path = DEFAULT_SAVE_PATH,
    dequantize: bool = False,
) -> Path:
    """Load the base with its adapters, fuse them and save a standalone checkpoint."""
    model_path = resolve_model_path(model)
    config = HunYuanMoEV1Config.from_pretrained(model_path)
    fused = fuse_adapters(load_model(model_path, adapter_path=adapter_path), dequantize)
    if dequantize:
        config.quantization = None
    return save_checkpoint(fused, config, model_path, save_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hunyuan_mlx.fuse", description="Fuse trained adapters into a HunYuan model."
    )
    parser.add_argument("--model", required=True, help="Local model directory or Hub repo id.")
    parser.add_argument(
        "--adapter-path",
        default=DEFAULT_ADAPTER_PATH,
        help="Directory with adapters.safetensors and adapter_config.json.",
    )
    parser.add_argument("--save-path", default=DEFAULT_SAVE_PATH, help="Output directory.")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="Write unquantized weights (from a quantized base).",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = fuse(args.model, args.adapter_path, args.save_path, args.dequantize)
    print(f"Saved the fused model to {out}")


if __name__ == "__main__":
    main()
