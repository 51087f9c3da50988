"""Fold trained adapters into the weights and save a standalone checkpoint.

The result is a standalone checkpoint that `load_model` reads: this project's tensor names,
config.json with the base's `quantization` block (fused layers are re-quantized with their own
group size, bits and mode) or none with `--dequantize`, and the base's tokenizer files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import save_model

from ..files import INDEX_FILE, check_destination, staged_output
from ..loading import load_model, resolve_model_path
from ..models import HunYuanMoEV1Config
from .adapters import fuse_adapters

# mlx-lm's defaults.
DEFAULT_ADAPTER_PATH = "adapters"
DEFAULT_SAVE_PATH = "fused_model"
# Files of the source that the fused checkpoint writes anew.
REWRITTEN = ("config.json", INDEX_FILE)


def save_checkpoint(
    model: nn.Module,
    config: HunYuanMoEV1Config,
    source: Path,
    save_path: str | Path,
    force: bool = False,
) -> Path:
    """Write `model` with `config`, plus every side file of `source` (tokenizer, generation),
    whole or not at all; a non-empty `save_path` is replaced only with `force`."""
    save_path = Path(save_path)
    check_destination(save_path, source, force)
    with staged_output(save_path, force) as tmp:
        save_model(tmp, model)
        config.save_pretrained(tmp)
        for file in source.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name not in REWRITTEN:
                shutil.copyfile(file, tmp / file.name)
    return save_path


def fuse(
    model: str | Path,
    adapter_path: str | Path = DEFAULT_ADAPTER_PATH,
    save_path: str | Path = DEFAULT_SAVE_PATH,
    dequantize: bool = False,
    force: bool = False,
) -> Path:
    """Load the base with its adapters, fuse them and save a standalone checkpoint."""
    model_path = resolve_model_path(model)
    check_destination(Path(save_path), model_path, force)  # before the minutes of loading
    config = HunYuanMoEV1Config.from_pretrained(model_path)
    # The checkpoint's own dtype, not the CPU's float32: the fused model is written as loaded.
    base = load_model(model_path, adapter_path=adapter_path, dtype="checkpoint")
    fused = fuse_adapters(base, dequantize)
    if dequantize:
        config.quantization = None
    return save_checkpoint(fused, config, model_path, save_path, force)
