"""Convert a HunYuan checkpoint to MLX safetensors: plan, then stream (read, map names, cast or
quantize, write shards), then finish.

Memory stays bounded by about one input shard + one output shard + one layer's stacked experts:
input shards are read one at a time (lazily), a layer's experts are stacked as soon as all of them
have been read (even across shards), and output shards are written as they fill. The output is
written into a temporary directory beside the destination and renamed into place at the end.

Inputs: the original release (`model_type: "hunyuan"`, per-expert tensors, an `lm_head.weight`
even when tied), transformers 5 saves (per-expert or fused 3-D experts), and MLX checkpoints
(this project's or mlx-lm's `switch_mlp` layout) to re-quantize (`-q`) or `--dequantize`.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from .files import (
    INDEX_FILE,
    check_destination,
    check_safetensors,
    check_tensors,
    format_size,
    parse_size,
    read_json,
    staged_output,
    weight_files,
)
from .loading import resolve_model_path
from .mlx_lm_model import add_model_file
from .models import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
from .models.quantization import (
    DEFAULT_Q_MODE,
    DEFAULT_QUANT_RECIPE,
    check_quant_params,
    dequantize,
    is_packed,
    is_quantizable,
    is_routed_expert,
    is_router,
    module_params,
    quant_params,
    quantize_in_blocks,
    recipe_params,
)
from .models.weights import sanitize
from .tokenizer import TIKTOKEN_FILE, TOKENIZER_JSON_FILE, write_tokenizer_json

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_DTYPE = "bfloat16"
DEFAULT_MLX_PATH = "mlx_model"
DEFAULT_MAX_SHARD_SIZE = "5GB"
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
# Safetensors dtype names and the MLX types they read as. Tensors must be floats, but for the
# packed arrays of a quantized module (`is_packed`).
FLOAT_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
SAFETENSORS_DTYPES = {
    **FLOAT_DTYPES,
    **{"U8": mx.uint8, "U16": mx.uint16, "U32": mx.uint32, "U64": mx.uint64},
    **{"I8": mx.int8, "I16": mx.int16, "I32": mx.int32, "I64": mx.int64, "BOOL": mx.bool_},
}
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


@dataclass(frozen=True)
class ConversionOptions:
    """How to convert (the command's flags; defaults as mlx_lm.convert's)."""

    quantize: bool = False
    q_group_size: int | None = None  # None: the mode's default (Q_MODE_DEFAULTS)
    q_bits: int | None = None
    q_mode: str = DEFAULT_Q_MODE
    quant_recipe: str = DEFAULT_QUANT_RECIPE
    dtype: str = DEFAULT_DTYPE
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
    dequantize: bool = False
    force: bool = False  # replace a non-empty destination


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
        dtype = SAFETENSORS_DTYPES.get(tensor.dtype)
        packed = dtype is not None and is_packed(name, dtype) and f"{module}.scales" in tensors
        if tensor.dtype not in FLOAT_DTYPES and not packed:
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
        weights[f"{module}.weight"] = dequantize(
            weights.pop(f"{module}.weight"),
            weights.pop(name),
            weights.pop(f"{module}.biases", None),
            params,
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
    for name, tensor in source.tensors.items():
        shape = _per_expert_shape(name, expected)
        if shape is not None and tensor.shape != shape:
            raise ValueError(
                f"Tensor {name} in {tensor.file} has shape {tensor.shape}, but the config "
                f"implies {shape}"
            )
    found: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for names in source.groups.values():
        placeholders = {
            n: mx.zeros(source.tensors[n].shape, SAFETENSORS_DTYPES[source.tensors[n].dtype])
            for n in names
        }
        files = ", ".join(sorted({source.tensors[n].file.name for n in names}))
        for name, array in _map_group(source, names, placeholders).items():
            found[name], origin[name] = tuple(array.shape), files
    check_tensors(
        found,
        expected,
        f"Checkpoint {source.path} does not match its config",
        where=lambda name: f"{name} (in {origin[name]})",
    )


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


def _component(name: str) -> str:
    """The part of the model a tensor belongs to, for the summary."""
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if "norm" in name:
        return "norms"
    if is_router(name):
        return "router"
    if "shared_mlp" in name:
        return "shared expert"
    if is_routed_expert(name):
        return "routed experts"
    return "attention"


def _precision_label(params: dict[str, Any] | None, dtype: mx.Dtype) -> str:
    if params is None:
        return str(dtype).removeprefix("mlx.core.")
    return f"{params['bits']}-bit {params['mode']} g{params['group_size']}"


def _copy_side_files(source_path: Path, out: Path) -> None:
    """Tokenizer and generation files, minus remote-code entries, plus a tokenizer.json."""
    for name in COPIED_FILES:
        file = source_path / name
        if not file.is_file():
            continue
        if name == "tokenizer_config.json":
            tokenizer_config = read_json(file)
            for key in REMOTE_CODE_KEYS:
                tokenizer_config.pop(key, None)
            (out / name).write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        else:
            shutil.copyfile(file, out / name)
    if (source_path / TIKTOKEN_FILE).is_file() and not (out / TOKENIZER_JSON_FILE).exists():
        # About 1.5 s for the release's vocabulary on a 2-core CPU, after the tensors' bar.
        print(f"Writing {TOKENIZER_JSON_FILE} from {TIKTOKEN_FILE}", file=sys.stderr, flush=True)
        write_tokenizer_json(source_path / TIKTOKEN_FILE, out / TOKENIZER_JSON_FILE)


@dataclass
class ConversionPlan:
    """Everything a conversion needs, checked before any tensor is read or anything written."""

    source: _Source
    mlx_path: Path
    out_config: HunYuanMoEV1Config
    # The output model's parameter shapes and modules, from a skeleton never evaluated.
    expected: dict[str, tuple[int, ...]]
    modules: dict[str, Any]
    out_dtype: mx.Dtype
    max_bytes: int
    quant: dict[str, Any] | None  # the routed experts' parameters when quantizing
    quant_recipe: str
    source_name: str  # as the user gave it: a path or a Hub repo id


@dataclass
class _Written:
    """What streaming wrote: shards, the config's `quantization` block, precision counts."""

    writer: _ShardWriter
    quantization: dict[str, Any] | None
    precision: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    parameters: int = 0


def plan_conversion(
    hf_path: str | Path, mlx_path: str | Path, options: ConversionOptions
) -> ConversionPlan:
    """Check the options, the destination and every source tensor's name, shape and dtype."""
    o = options
    if o.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {o.dtype!r}")
    quant = None
    if o.quantize:
        quant = quant_params(o.q_bits, o.q_group_size, o.q_mode)
        # What the recipe gives a module other than a routed expert; rejects unknown recipes.
        check_quant_params(recipe_params(o.quant_recipe, "model.embed_tokens", quant))
    else:
        defaults = ConversionOptions()
        quant_options = ("q_bits", "q_group_size", "q_mode", "quant_recipe")
        if any(getattr(o, k) != getattr(defaults, k) for k in quant_options):
            raise ValueError("Quantization options (bits, group size, mode, recipe) need -q")
    max_bytes = parse_size(o.max_shard_size)
    mlx_path = Path(mlx_path).expanduser()
    source_path = resolve_model_path(hf_path)
    check_destination(mlx_path, source_path, o.force)
    source = _read_source(source_path)
    quantized = source.config.quantization
    if quantized is not None and not o.dequantize:
        bits = quantized.get("bits")
        raise ValueError(
            f"{source_path} is already quantized ({bits}-bit): convert from the original float "
            "weights; --dequantize writes it back to float, and --dequantize with -q re-quantizes "
            "it, keeping its own rounding error on top of the new one"
        )
    if o.dequantize and quantized is None:
        raise ValueError(f"--dequantize needs a quantized MLX checkpoint; {source_path} is not")
    out_config = HunYuanMoEV1Config.from_dict(
        {k: v for k, v in source.config.to_dict().items() if k != "quantization"}
    )
    skeleton = HunYuanMoEV1ForCausalLM(out_config)  # lazy: its random init is never evaluated
    expected = {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}
    _check_mapping(source, expected)
    return ConversionPlan(
        source=source,
        mlx_path=mlx_path,
        out_config=out_config,
        expected=expected,
        modules=dict(skeleton.named_modules()),
        out_dtype=getattr(mx, o.dtype),
        max_bytes=max_bytes,
        quant=quant,
        quant_recipe=o.quant_recipe,
        source_name=str(hf_path),
    )


def stream_conversion(plan: ConversionPlan, directory: Path) -> _Written:
    """Read the source one shard at a time, map each complete group of tensors, cast or quantize
    it, and write output shards into `directory` as they fill."""
    source = plan.source
    quantization = dict(plan.quant) if plan.quant else None
    out = _Written(_ShardWriter(directory, plan.max_bytes), quantization)
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
                    _write_tensor(plan, out, out_name, mapped.pop(out_name))
                mx.clear_cache()
            del arrays
    return out


def _write_tensor(plan: ConversionPlan, out: _Written, name: str, array: mx.array) -> None:
    """Cast or quantize one mapped tensor as the plan says and hand it to the shard writer."""
    path, leaf = name.rsplit(".", 1)
    module_quant = None
    if plan.quant is not None and leaf == "weight" and is_quantizable(path, plan.modules[path]):
        module_quant = recipe_params(plan.quant_recipe, path, plan.quant)
        if array.shape[-1] % module_quant["group_size"]:
            module_quant = None  # as mlx-lm: a width the group size does not divide stays
            out.quantization[path] = False
        elif module_quant != plan.quant:
            out.quantization[path] = dict(module_quant)
    if module_quant is not None:
        packed = quantize_in_blocks(array.astype(plan.out_dtype), module_quant)
        for suffix, part in zip(("weight", "scales", "biases"), packed):
            out.writer.add(f"{path}.{suffix}", part)
    else:
        if not is_router(name):  # sanitize gave the router its dtype; the rest takes the output's
            array = array.astype(plan.out_dtype)
        mx.eval(array)
        out.writer.add(name, array)
    out.precision[_component(name)][_precision_label(module_quant, array.dtype)] += array.size
    out.parameters += array.size


def finish_conversion(plan: ConversionPlan, out: _Written, directory: Path) -> list[Path]:
    """The last shard and the index, config.json with its `quantization` block, and the
    tokenizer and generation files; returns the shards."""
    shards = out.writer.close()
    config = plan.out_config
    config.quantization = out.quantization
    for key in ("quantization_config", "auto_map"):
        config.extra.pop(key, None)
    config.save_pretrained(directory)
    add_model_file(directory)  # mlx-lm interop: config.json names a file importing this package
    _copy_side_files(plan.source.path, directory)
    write_model_card(plan, out, directory)
    return shards


def write_model_card(plan: ConversionPlan, out: _Written, directory: Path) -> None:
    """A README.md saying what the folder is, how it was made and how to run it, with mlx-lm's
    metadata (its `create_model_card` is not used: it fetches the source's card from the Hub)."""
    from huggingface_hub import ModelCard, ModelCardData

    downloaded = plan.source.path != Path(plan.source_name).expanduser()
    metadata = ModelCardData(
        base_model=plan.source_name if downloaded else None,  # a Hub repo id, not a local path
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=["mlx", "hunyuan"],
    )
    precision = "unquantized"
    if out.quantization is not None:
        q = out.quantization
        precision = f"{q['bits']}-bit {q['mode']}, group size {q['group_size']}"
        if plan.quant_recipe != "uniform":
            precision += f", recipe {plan.quant_recipe}"
    text = f"""# {plan.mlx_path.name}

Hunyuan MoE V1 in MLX format ({precision}), converted from `{plan.source_name}` by hunyuan-mlx
(`python -m hunyuan_mlx.convert`). With hunyuan-mlx installed:

```sh
python -m hunyuan_mlx.generate --model PATH_TO_THIS_FOLDER --prompt "Hello"
```
"""
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{text}").save(directory / "README.md")


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = DEFAULT_MLX_PATH,
    upload_repo: str | None = None,
    **options: Any,
) -> ConversionSummary:
    """Convert `hf_path` (directory or Hub repo id) into an MLX checkpoint at `mlx_path`;
    `options` are `ConversionOptions` fields (`quantize=True, q_bits=4`, ...).

    The output is written into a temporary directory beside `mlx_path` and renamed into place at
    the end; on any error or interrupt it is removed, and the source is never touched.
    """
    start = time.perf_counter()
    settings = ConversionOptions(**options)
    plan = plan_conversion(hf_path, mlx_path, settings)
    # Freed buffers go back to the system at once instead of into MLX's cache.
    cache_limit = mx.set_cache_limit(0)
    try:
        with staged_output(plan.mlx_path, settings.force) as tmp:
            written = stream_conversion(plan, tmp)
            shards = finish_conversion(plan, written, tmp)
    finally:
        mx.set_cache_limit(cache_limit)
    mlx_path = plan.mlx_path

    summary = ConversionSummary(
        mlx_path=mlx_path,
        parameters=written.parameters,
        tensor_bytes=written.writer.total_size,
        disk_bytes=sum((mlx_path / f.name).stat().st_size for f in shards),
        num_shards=len(shards),
        seconds=time.perf_counter() - start,
        precision={k: dict(v) for k, v in written.precision.items()},
    )
    print(summary.format())
    if upload_repo is not None:
        upload(mlx_path, upload_repo)
    return summary


def upload(mlx_path: Path, upload_repo: str) -> None:
    """Create (if needed) the Hub model repo `upload_repo` and upload the converted folder.

    Not mlx-lm's `upload_to_hub`: it replaces the card's text with mlx-lm's own instructions,
    which leave out that this model needs hunyuan-mlx installed.
    """
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(upload_repo, exist_ok=True)
        upload_folder(repo_id=upload_repo, folder_path=str(mlx_path), repo_type="model")
    except Exception as e:  # the Hub client raises its own, requests' and httpx's errors
        raise RuntimeError(
            f"Could not upload to the Hub repo {upload_repo} ({type(e).__name__}: {e}); "
            f"the converted model is in {mlx_path}"
        ) from None
    print(f"Uploaded to https://huggingface.co/{upload_repo}")


