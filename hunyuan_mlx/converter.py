"""Convert a HunYuan checkpoint to MLX safetensors: cast, quantize and shard, streaming.

Memory stays bounded by about one input shard + one output shard + one layer's stacked experts:
input shards are read one at a time (lazily), a layer's experts are stacked as soon as all of them
have been read (even across shards), and output shards are written as they fill. The output is
written into a temporary directory beside the destination and renamed into place at the end.

Inputs: the original release (`model_type: "hunyuan"`, per-expert tensors, an `lm_head.weight`
even when tied), transformers 5 saves (per-expert or fused 3-D experts), and MLX checkpoints
(this project's or mlx-lm's `switch_mlp` layout) to re-quantize (`-q`) or `--dequantize`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from .config import HunYuanMoEV1Config
from .loading import INDEX_FILE, check_safetensors, resolve_model_path, weight_files
from .mlx_lm_model import add_model_file
from .model import HunYuanMoEV1ForCausalLM
from .quantize import (
    DEFAULT_QUANT_RECIPE,
    QUANT_KEYS,
    QUANT_RECIPES,
    is_quantizable,
    module_params,
    recipe_params,
)
from .tokenizer import TIKTOKEN_FILE, TOKENIZER_JSON_FILE
from .tokenizer_json import write_tokenizer_json
from .weights import sanitize

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_DTYPE = "bfloat16"
DEFAULT_MLX_PATH = "mlx_model"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Quantization mode -> its default (group_size, bits), as mlx-lm.
Q_MODE_DEFAULTS: dict[str, tuple[int, int]] = {
    "affine": (64, 4),
    "mxfp4": (32, 4),
    "nvfp4": (16, 4),
    "mxfp8": (32, 8),
}
DEFAULT_Q_MODE = "affine"
# Files copied beside the weights so the output loads on its own; no code files.
COPIED_FILES = (
    "tokenizer_config.json",
    TOKENIZER_JSON_FILE,
    TIKTOKEN_FILE,
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
# tokenizer_config.json keys that point at the release's own tokenizer code (HYTokenizer).
REMOTE_CODE_KEYS = ("auto_map", "tokenizer_class")
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
FLOAT_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
# Packed quantized weights are uint32; the scales of the mx* / nv* modes are uint8.
PACKED_DTYPES = {"U32": mx.uint32, "U8": mx.uint8}
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}
QUANTIZE_BLOCK_ELEMENTS = 2**24  # weights quantized per evaluation (64 MB of float32)
# Bytes a safetensors header spends per tensor beyond its name, with room to spare.
HEADER_BYTES_PER_TENSOR = 128
HEADER_BYTES_BASE = 64
# Parts of the model the summary reports, in model order.
COMPONENTS = (
    "embedding",
    "attention",
    "norms",
    "router",
    "routed experts",
    "shared expert",
    "head",
)
EXPERTS_RE = re.compile(r"^(model\.layers\.\d+\.mlp)\.(?:experts|switch_mlp)\.")
PER_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.(gate|up|down)_proj\.weight$"
)


def parse_size(size: str | int) -> int:
    """Bytes in a size such as "5GB", "500MB", "40KiB" or a plain number."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else None
        if unit not in SIZE_UNITS:
            raise ValueError(f"Cannot read size {size!r}: use a number with B, KB, MB, GB or GiB")
        value = int(float(match.group(1)) * SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"Size must be positive, got {size!r}")
    return value


def quant_params(bits: int | None, group_size: int | None, mode: str) -> dict[str, Any]:
    """The global quantization parameters, mode defaults filled in, checked against MLX."""
    if mode not in Q_MODE_DEFAULTS:
        raise ValueError(f"Unknown quantization mode {mode!r}; choose from {list(Q_MODE_DEFAULTS)}")
    default_group_size, default_bits = Q_MODE_DEFAULTS[mode]
    params = {
        "group_size": default_group_size if group_size is None else group_size,
        "bits": default_bits if bits is None else bits,
        "mode": mode,
    }
    check_quant_params(params)
    return params


def quantize_in_blocks(array: mx.array, params: dict[str, Any]) -> tuple[mx.array, ...]:
    """`mx.quantize`, evaluated a block of rows at a time: groups lie within rows, so the result
    is the same, but MLX's float32 working copy is one block, not (say) a layer's experts."""
    mx.eval(array)
    rows = array.reshape(-1, array.shape[-1])
    step = max(1, QUANTIZE_BLOCK_ELEMENTS // array.shape[-1])
    blocks = []
    for start in range(0, rows.shape[0], step):
        block = mx.quantize(rows[start : start + step], **params)
        mx.eval(*block)
        blocks.append(block)
    del rows
    packed = tuple(mx.concatenate(parts).reshape(*array.shape[:-1], -1) for parts in zip(*blocks))
    mx.eval(*packed)
    return packed


def check_quant_params(params: dict[str, Any]) -> None:
    """Raise a ValueError if MLX cannot quantize with these bits, group size and mode."""
    try:
        mx.eval(mx.quantize(mx.zeros((1, 2 * 128)), **params))
    except (ValueError, RuntimeError) as e:
        raise ValueError(
            f"MLX cannot quantize with bits={params['bits']}, group_size={params['group_size']}, "
            f"mode={params['mode']!r}: {e}"
        ) from None


def format_size(size: int) -> str:
    """A byte count in the largest decimal unit that keeps it at least 1."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


@dataclass
class ConversionSummary:
    """What a conversion wrote: size, precision per component, time."""

    mlx_path: Path
    parameters: int
    tensor_bytes: int
    disk_bytes: int
    num_shards: int
    seconds: float
    # component -> precision label -> parameters
    precision: dict[str, dict[str, int]]

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.parameters

    def format(self) -> str:
        lines = [
            f"Wrote {self.mlx_path}: {self.parameters:,} parameters, "
            f"{format_size(self.disk_bytes)} on disk in {self.num_shards} shards, "
            f"{self.bits_per_weight:.3f} bits per weight, {self.seconds:.1f} s",
        ]
        for component in sorted(self.precision, key=COMPONENTS.index):
            labels = self.precision[component]
            text = ", ".join(f"{label} ({n:,})" for label, n in labels.items())
            lines.append(f"  {component:<15} {text}")
        return "\n".join(lines)


@dataclass
class _Tensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class _Source:
    path: Path
    config: HunYuanMoEV1Config
    files: list[Path]
    tensors: dict[str, _Tensor]
    # group key -> names of the source tensors that must be read before the group is written
    groups: dict[str, set[str]] = field(default_factory=dict)


class _ShardWriter:
    """Collects evaluated tensors and writes a shard whenever the next one would overflow it."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total_size = 0
        self._shard: dict[str, mx.array] = {}
        self._shard_bytes = HEADER_BYTES_BASE

    def add(self, name: str, array: mx.array) -> None:
        size = array.nbytes + HEADER_BYTES_PER_TENSOR + len(name)
        if self._shard and self._shard_bytes + size > self.max_bytes:
            self.flush()
        self._shard[name] = array
        self._shard_bytes += size
        self.total_size += array.nbytes

    def flush(self) -> None:
        if not self._shard:
            return
        # The final name needs the shard count, known only at the end.
        file = self.directory / f"model-{len(self.files) + 1:05d}.safetensors"
        mx.save_safetensors(str(file), self._shard, metadata={"format": "mlx"})
        for name in self._shard:
            self.weight_map[name] = len(self.files)
        self.files.append(file)
        self._shard = {}
        self._shard_bytes = HEADER_BYTES_BASE
        mx.clear_cache()

    def close(self) -> list[Path]:
        """Write the last shard, give every shard its `-of-N` name, write the index."""
        self.flush()
        total = len(self.files)
        names = [SHARD_NAME.format(i + 1, total) for i in range(total)]
        for file, name in zip(self.files, names):
            file.rename(self.directory / name)
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())},
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.directory / name for name in names]


def _group_key(name: str) -> str:
    """Tensors written together: a layer's experts, or one module's weight/scales/biases/bias."""
    match = EXPERTS_RE.match(name)
    if match:
        return f"{match.group(1)}.experts"
    return name.rsplit(".", 1)[0]


def _read_source(path: Path) -> _Source:
    """Config, shard list and every tensor's header entry, each file checked for truncation."""
    config = HunYuanMoEV1Config.from_pretrained(path)
    files = weight_files(path)
    tensors: dict[str, _Tensor] = {}
    for file in files:
        for name, entry in check_safetensors(file).items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise ValueError(f"Tensor {name} is in both {tensors[name].file} and {file}")
            tensors[name] = _Tensor(file, entry["dtype"], tuple(entry["shape"]))
    for name, tensor in tensors.items():
        module = name.rsplit(".", 1)[0]
        packed = (name.endswith(".weight") and tensor.dtype == "U32") or (
            name.endswith(".scales") and tensor.dtype == "U8"
        )
        if tensor.dtype not in FLOAT_DTYPES and not (packed and f"{module}.scales" in tensors):
            raise ValueError(
                f"Tensor {name} in {tensor.file} has dtype {tensor.dtype}, which is not supported "
                f"(expected one of {', '.join(FLOAT_DTYPES)})"
            )
    source = _Source(path, config, files, tensors)
    groups: dict[str, set[str]] = defaultdict(set)
    for name in tensors:
        groups[_group_key(name)].add(name)
    source.groups = dict(groups)
    return source


def _dequantize_modules(
    weights: dict[str, mx.array], quantization: dict[str, Any]
) -> dict[str, mx.array]:
    """Replace each quantized module's weight/scales/biases by its dequantized weight, in place.

    Parameters are looked up under the source's own module paths (e.g. mlx-lm's `switch_mlp`).
    """
    for name in [n for n in weights if n.endswith(".scales")]:
        module = name[: -len(".scales")]
        params = module_params(module, quantization) or module_params("", quantization)
        weights[f"{module}.weight"] = mx.dequantize(
            weights.pop(f"{module}.weight"),
            weights.pop(name),
            weights.pop(f"{module}.biases", None),
            **{k: params[k] for k in QUANT_KEYS if k in params},
        )
    return weights


def _map_group(
    source: _Source, names: set[str], arrays: dict[str, mx.array]
) -> dict[str, mx.array]:
    """A group's source tensors in this project's names, stacked, dequantized if they were."""
    try:
        if source.config.quantization is not None:
            arrays = _dequantize_modules(arrays, source.config.quantization)
        return sanitize(arrays, source.config)
    except (ValueError, RuntimeError) as e:
        files = sorted({source.tensors[n].file.name for n in names})
        raise ValueError(f"{e} (reading {', '.join(files)} of {source.path})") from None


def _check_mapping(source: _Source, expected: dict[str, tuple[int, ...]]) -> None:
    """Map every group on shape-only placeholders (never evaluated) and compare with the model.

    Catches missing, unexpected and misshapen tensors before anything is read or written.
    """
    produced = set()
    for name, tensor in source.tensors.items():
        shape = _per_expert_shape(name, expected)
        if shape is not None and tensor.shape != shape:
            raise ValueError(
                f"Tensor {name} in {tensor.file} has shape {tensor.shape}, but the config "
                f"implies {shape}"
            )
    for names in source.groups.values():
        placeholders = {
            n: mx.zeros(source.tensors[n].shape, _dtype_of(source.tensors[n].dtype)) for n in names
        }
        for name, array in _map_group(source, names, placeholders).items():
            files = ", ".join(sorted({source.tensors[n].file.name for n in names}))
            if name not in expected:
                raise ValueError(
                    f"Tensor {name} (in {files}) is not a parameter of the model its config "
                    f"describes"
                )
            if tuple(array.shape) != expected[name]:
                raise ValueError(
                    f"Tensor {name} (in {files}) has shape {tuple(array.shape)}, but the config "
                    f"implies {expected[name]}"
                )
            produced.add(name)
    missing = sorted(expected.keys() - produced)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"Checkpoint {source.path} is missing {len(missing)} tensors: {shown}")


def _per_expert_shape(name: str, expected: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape the model needs for one expert's unquantized projection, else None."""
    match = PER_EXPERT_RE.match(name)
    if match is None:
        return None
    prefix, proj = match.groups()
    if proj == "down":
        stacked = expected.get(f"{prefix}.down_proj.weight")
        return stacked and stacked[1:]
    stacked = expected.get(f"{prefix}.gate_up_proj.weight")
    return stacked and (stacked[1] // 2, stacked[2])


def _dtype_of(safetensors_dtype: str) -> mx.Dtype:
    return {**FLOAT_DTYPES, **PACKED_DTYPES}[safetensors_dtype]


def _component(name: str) -> str:
    """The part of the model a tensor belongs to, for the summary."""
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if "norm" in name:
        return "norms"
    if ".gate.wg." in name:
        return "router"
    if "shared_mlp" in name:
        return "shared expert"
    if ".mlp.experts." in name:
        return "routed experts"
    return "attention"


def _precision_label(params: dict[str, Any] | None, dtype: mx.Dtype) -> str:
    if params is None:
        return str(dtype).removeprefix("mlx.core.")
    return f"{params['bits']}-bit {params['mode']} g{params['group_size']}"


def _check_destination(mlx_path: Path, source_path: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty destination without `force`, and ever the source."""
    destination, source = mlx_path.resolve(), source_path.resolve()
    if destination == source or destination in source.parents:
        raise ValueError(f"Output path {mlx_path} would overwrite the source {source_path}")
    if not mlx_path.exists() or force:
        return
    if mlx_path.is_dir() and not any(mlx_path.iterdir()):
        return
    raise ValueError(f"Output path {mlx_path} already exists and is not empty (use --force)")


def _replace(tmp: Path, mlx_path: Path) -> None:
    """Move the finished output into place; an existing destination is removed only after."""
    old = None
    if mlx_path.exists() or mlx_path.is_symlink():
        old = mlx_path.with_name(f".{mlx_path.name}.old-{os.getpid()}")
        mlx_path.rename(old)
    tmp.rename(mlx_path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _copy_side_files(source_path: Path, out: Path) -> None:
    """Tokenizer and generation files, minus remote-code entries, plus a tokenizer.json."""
    for name in COPIED_FILES:
        file = source_path / name
        if not file.is_file():
            continue
        if name == "tokenizer_config.json":
            try:
                tokenizer_config = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
            for key in REMOTE_CODE_KEYS:
                tokenizer_config.pop(key, None)
            (out / name).write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        else:
            shutil.copyfile(file, out / name)
    if (source_path / TIKTOKEN_FILE).is_file() and not (out / TOKENIZER_JSON_FILE).exists():
        write_tokenizer_json(source_path / TIKTOKEN_FILE, out / TOKENIZER_JSON_FILE)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = DEFAULT_MLX_PATH,
    quantize: bool = False,
    q_group_size: int | None = None,
    q_bits: int | None = None,
    q_mode: str = DEFAULT_Q_MODE,
    quant_recipe: str = DEFAULT_QUANT_RECIPE,
    dtype: str = DEFAULT_DTYPE,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    dequantize: bool = False,
    upload_repo: str | None = None,
    force: bool = False,
) -> ConversionSummary:
    """Convert `hf_path` (directory or Hub repo id) into an MLX checkpoint at `mlx_path`."""
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if quantize and dequantize:
        raise ValueError("Choose either quantize or dequantize, not both")
    if quantize:
        params = quant_params(q_bits, q_group_size, q_mode)
        # What the recipe gives a module other than a routed expert; rejects unknown recipes.
        check_quant_params(recipe_params(quant_recipe, "model.embed_tokens", params))
    elif (q_bits, q_group_size, q_mode, quant_recipe) != (
        None,
        None,
        DEFAULT_Q_MODE,
        DEFAULT_QUANT_RECIPE,
    ):
        raise ValueError("Quantization options (bits, group size, mode, recipe) need -q")
    max_bytes = parse_size(max_shard_size)
    out_dtype = getattr(mx, dtype)
    mlx_path = Path(mlx_path).expanduser()

    source_path = resolve_model_path(hf_path)
    _check_destination(mlx_path, source_path, force)
    source = _read_source(source_path)
    if source.config.quantization is not None and not (quantize or dequantize):
        raise ValueError(
            f"{source_path} is already quantized: pass --dequantize, or -q to re-quantize"
        )
    if dequantize and source.config.quantization is None:
        raise ValueError(f"--dequantize needs a quantized MLX checkpoint; {source_path} is not")

    out_config = HunYuanMoEV1Config.from_dict(
        {k: v for k, v in source.config.to_dict().items() if k != "quantization"}
    )
    skeleton = HunYuanMoEV1ForCausalLM(out_config)  # lazy: its random init is never evaluated
    expected = {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}
    modules = dict(skeleton.named_modules())
    _check_mapping(source, expected)

    quantization: dict[str, Any] | None = dict(params) if quantize else None
    precision: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    parameters = 0

    def emit(writer: _ShardWriter, name: str, array: mx.array) -> None:
        nonlocal parameters
        path, leaf = name.rsplit(".", 1)
        module_quant = None
        if quantization is not None and leaf == "weight" and is_quantizable(path, modules[path]):
            module_quant = recipe_params(quant_recipe, path, params)
            if array.shape[-1] % module_quant["group_size"]:
                module_quant = None  # as mlx-lm: a width the group size does not divide stays
                quantization[path] = False
            elif module_quant != params:
                quantization[path] = dict(module_quant)
        if module_quant is not None:
            packed = quantize_in_blocks(array.astype(out_dtype), module_quant)
            for suffix, part in zip(("weight", "scales", "biases"), packed):
                writer.add(f"{path}.{suffix}", part)
        else:
            # The router stays float32 (sanitize made it so); the rest takes the output dtype.
            if not name.endswith(".gate.wg.weight"):
                array = array.astype(out_dtype)
            mx.eval(array)
            writer.add(name, array)
        precision[_component(name)][_precision_label(module_quant, array.dtype)] += array.size
        parameters += array.size

    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mlx_path.name}.", suffix=".tmp", dir=mlx_path.parent))
    # Freed buffers go back to the system at once instead of into MLX's cache.
    cache_limit = mx.set_cache_limit(0)
    try:
        writer = _ShardWriter(tmp, max_bytes)
        pending: dict[str, dict[str, mx.array]] = defaultdict(dict)
        with tqdm(total=len(source.tensors), desc="Converting", unit="tensor", disable=None) as bar:
            for file in source.files:
                bar.set_postfix_str(file.name)
                try:
                    arrays = mx.load(str(file))
                except (RuntimeError, ValueError) as e:
                    raise ValueError(f"Could not read {file}: {e}") from None
                for name in list(arrays):
                    key = _group_key(name)
                    pending[key][name] = arrays.pop(name)
                    bar.update()
                    if len(pending[key]) < len(source.groups[key]):
                        continue
                    group = pending.pop(key)
                    mapped = _map_group(source, set(group), group)
                    del group
                    for out_name in sorted(mapped):
                        emit(writer, out_name, mapped.pop(out_name))
                    mx.clear_cache()
                del arrays
        shards = writer.close()
        out_config.quantization = quantization
        for key in ("quantization_config", "auto_map"):
            out_config.extra.pop(key, None)
        out_config.save_pretrained(tmp)
        # mlx-lm interop: config.json names a model file that imports this package.
        add_model_file(tmp)
        _copy_side_files(source_path, tmp)
        _replace(tmp, mlx_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        mx.set_cache_limit(cache_limit)

    summary = ConversionSummary(
        mlx_path=mlx_path,
        parameters=parameters,
        tensor_bytes=writer.total_size,
        disk_bytes=sum((mlx_path / f.name).stat().st_size for f in shards),
        num_shards=len(shards),
        seconds=time.perf_counter() - start,
        precision={k: dict(v) for k, v in precision.items()},
    )
    print(summary.format())
    if upload_repo is not None:
        upload(mlx_path, upload_repo)
    return summary


def upload(mlx_path: Path, upload_repo: str) -> None:
    """Create (if needed) the Hub model repo `upload_repo` and upload the converted folder."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(upload_repo, exist_ok=True)
    upload_folder(repo_id=upload_repo, folder_path=str(mlx_path), repo_type="model")
    print(f"Uploaded to https://huggingface.co/{upload_repo}")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with mlx_lm.convert's flag names where it has the flag."""
    parser = argparse.ArgumentParser(
        description="Convert a HunYuan MoE V1 checkpoint to MLX (streaming, optionally quantized)."
    )
    parser.add_argument(
        "--hf-path", "--model", required=True, help="Source: local directory or Hub repo id."
    )
    parser.add_argument("--mlx-path", default=DEFAULT_MLX_PATH, help="Output directory.")
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
        "--q-mode", default=DEFAULT_Q_MODE, choices=list(Q_MODE_DEFAULTS), help="Quantization mode."
    )
    parser.add_argument(
        "--quant-recipe",
        default=DEFAULT_QUANT_RECIPE,
        choices=list(QUANT_RECIPES),
        help="uniform: every module at --q-bits; mixed_N: routed experts at --q-bits, attention, "
        "shared expert and embedding/head at N bits.",
    )
    parser.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=DTYPES,
        help="Type of the unquantized weights and of quantization scales.",
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="Largest output shard, e.g. 5GB, 500MB.",
    )
    parser.add_argument(
        "-d", "--dequantize", action="store_true", help="Dequantize a quantized MLX checkpoint."
    )
    parser.add_argument("--upload-repo", default=None, help="Hub repo to upload the result to.")
    parser.add_argument(
        "--force", action="store_true", help="Replace an existing non-empty output directory."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: errors are one line on stderr and a non-zero exit, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        convert(**vars(args))
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
