"""Load a HunYuan checkpoint (local directory or Hub repo id) into the MLX model, strictly."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from .adapters import load_adapters
from .config import HunYuanMoEV1Config
from .model import HunYuanMoEV1ForCausalLM
from .quantize import apply_quantization
from .tokenizer import TIKTOKEN_FILE, TOKENIZER_JSON_FILE, HunYuanTokenizer

# What a model needs from a Hub repo: configs, weights and tokenizer files, nothing else.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.jinja"]
INDEX_FILE = "model.safetensors.index.json"
NAMES_SHOWN = 5  # how many missing / unexpected tensor names an error lists


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local directory as is; otherwise a Hub repo id, downloaded (only the needed files)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"Model path {path} is not a directory")
        return path
    repo_id = str(path_or_repo)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Model path {repo_id} does not exist (and is not a Hub repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(f"Could not get Hub repo {repo_id}: {e}") from e


def weight_files(model_path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index lists, or all in the directory."""
    index = model_path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        files = [model_path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file.name} is listed in {index} but does not exist")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {model_path}")
    return files


def check_safetensors(file: Path) -> dict[str, Any]:
    """Read a safetensors header and check the file holds every byte it declares.

    A truncated download otherwise only fails, obscurely, when the tensor is first used.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise ValueError(f"{file} is truncated or corrupt: its header runs past the end")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is corrupt: unreadable safetensors header ({e})") from e
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ValueError(
            f"{file} is truncated: it declares {8 + header_len + end} bytes but has {size}"
        )
    return header


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Every tensor of the files, read lazily (`mx.load` reads data on first evaluation)."""
    weights: dict[str, mx.array] = {}
    for file in files:
        check_safetensors(file)
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"Could not read {file}: {e}") from e
    return weights


def check_weights_match(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    """Every parameter filled and every tensor used, with the same shapes; else one clear error."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors ({', '.join(missing[:NAMES_SHOWN])}, ...)")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:NAMES_SHOWN])}, ...)"
        )
    for name in sorted(expected.keys() & weights.keys()):
        if expected[name].shape != weights[name].shape:
            problems.append(
                f"{name} has shape {tuple(weights[name].shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
            break
    if problems:
        raise ValueError(f"Checkpoint {source} does not match its config: " + "; ".join(problems))


def load_model(
    path_or_repo: str | Path,
    lazy: bool = False,
    model_class: type[nn.Module] = HunYuanMoEV1ForCausalLM,
    adapter_path: str | Path | None = None,
) -> nn.Module:
    """Build the model from config.json and fill it from the checkpoint's safetensors.

    With `lazy` the weights stay unevaluated and are read from the files on first use;
    otherwise they are evaluated here, one layer at a time. `adapter_path` applies the
    adapters of a `hunyuan_mlx.lora` run.
    """
    model_path = resolve_model_path(path_or_repo)
    config = HunYuanMoEV1Config.from_pretrained(model_path)
    model = model_class(config)
    weights = model.sanitize(load_safetensors(weight_files(model_path)))
    if config.quantization is not None:
        apply_quantization(model, config.quantization, weights)
    check_weights_match(model, weights, model_path)
    model.load_weights(list(weights.items()))
    del weights
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    model.eval()
    if not lazy:
        for layer in tqdm(model.model.layers, desc="Loading", unit="layer", disable=None):
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    return model


def load(
    path_or_repo: str | Path, lazy: bool = False, adapter_path: str | Path | None = None
) -> tuple[HunYuanMoEV1ForCausalLM, HunYuanTokenizer | None]:
    """The model (with adapters, if given) and its tokenizer (None when it has no vocabulary)."""
    model_path = resolve_model_path(path_or_repo)
    model = load_model(model_path, lazy=lazy, adapter_path=adapter_path)
    has_vocab = any((model_path / f).is_file() for f in (TIKTOKEN_FILE, TOKENIZER_JSON_FILE))
    return model, HunYuanTokenizer.from_pretrained(model_path) if has_vocab else None
