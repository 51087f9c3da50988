"""Load a HunYuan checkpoint (local directory or Hub repo id) into the MLX model, strictly."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from .distributed import make_plan, together
from .files import check_tensors, load_safetensors, parse_size, weight_files
from .models import FastPaths, HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
from .models.fast_paths import set_fast_paths
from .models.quantization import apply_quantization, is_routed_expert, is_router
from .streaming import check_fits, expert_store, stream_experts, streamed_policy
from .tokenizer import HunYuanTokenizer
from .tuner.adapters import load_adapters

# What a model needs from a Hub repo: configs, weights and tokenizer files, nothing else.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.jinja"]
# What floating parameters are computed in: "auto" is float32 on the CPU backend, where MLX's
# bfloat16 kernels are its slow path (benchmarks/cpu_dtype.py), and the checkpoint's elsewhere;
# "checkpoint" keeps the checkpoint's everywhere.
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16", "checkpoint")
DEFAULT_LOAD_DTYPE = "auto"


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local directory as is; otherwise a Hub repo id, downloaded (only the needed files).
    A folder it returned resolves to itself, so callers pass the result on, never the id."""
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
        raise FileNotFoundError(
            f"No local folder {path} (from {Path.cwd()}), and as a Hub repo id {repo_id} "
            f"could not be fetched: {' '.join(str(e).split())}"  # the Hub's text spans lines
        ) from None


def compute_dtype(dtype: str = DEFAULT_LOAD_DTYPE) -> mx.Dtype | None:
    """The type a `load_model` `dtype` name casts floating parameters to; None keeps the
    checkpoint's."""
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose from {', '.join(LOAD_DTYPES)}")
    if dtype == "auto":
        return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None
    return None if dtype == "checkpoint" else getattr(mx, dtype)


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Floating tensors (scales, biases, norms, unquantized weights) as `dtype`, lazily; packed
    integer weights and the float32 router as they are."""
    if dtype is None:
        return weights
    return {
        name: w.astype(dtype)
        if mx.issubdtype(w.dtype, mx.floating) and not is_router(name)
        else w
        for name, w in weights.items()
    }


def load_model(
    path_or_repo: str | Path,
    lazy: bool = False,
    model_class: type[nn.Module] = HunYuanMoEV1ForCausalLM,
    adapter_path: str | Path | None = None,
    dtype: str = DEFAULT_LOAD_DTYPE,
    group: mx.distributed.Group | None = None,
    pipeline: bool = False,
    fast_paths: str | FastPaths = "auto",
    memory_budget: int | str | None = None,
) -> nn.Module:
    """Build the model from config.json and fill it from the checkpoint's safetensors.

    With `lazy` the weights stay unevaluated and are read from the files on first use;
    otherwise they are evaluated here, one layer at a time. `adapter_path` applies the
    adapters of a `hunyuan_mlx.lora` run. `dtype` (`LOAD_DTYPES`) is what floating
    parameters, and so activations, are computed in. With a `group` of several ranks
    (`mlx.launch`), this rank's share only: tensor mode, or layers split with `pipeline` (see
    `distributed.py`); every check passes or fails on all ranks together, before any weight is
    evaluated.
    `fast_paths` is the policy (`FastPaths`) or its `--fast-paths` name (`FastPaths.named`).
    Weights over `memory_budget` (bytes, or a size such as "20GB") keep their routed
    experts on disk, streamed (`streaming.py`); without a budget, weights over the machine's
    memory are refused before any is read.
    """
    target_dtype = compute_dtype(dtype)
    budget = None if memory_budget is None else parse_size(memory_budget)
    if group is not None and group.size() == 1:
        if pipeline:
            raise ValueError(
                "--pipeline splits the layers over the ranks of mlx.launch; "
                "this is a single process"
            )
        group = None
    model = together(
        group,
        lambda: assemble(
            path_or_repo, model_class, adapter_path, target_dtype, group, pipeline, budget
        ),
    )
    policy = FastPaths.named(fast_paths) if isinstance(fast_paths, str) else fast_paths
    set_fast_paths(model, policy if expert_store(model) is None else streamed_policy(policy))
    if not lazy:
        together(group, lambda: evaluate(model, group))
    return model


def assemble(
    path_or_repo: str | Path,
    model_class: type[nn.Module],
    adapter_path: str | Path | None,
    dtype: mx.Dtype | None,
    group: mx.distributed.Group | None,
    pipeline: bool,
    budget: int | None = None,
) -> nn.Module:
    """The model with its (lazy) weights, cast to `dtype`, and adapters, split for this rank when
    `group` is set; its routed experts streamed from disk where the weights exceed `budget`."""
    model_path = resolve_model_path(path_or_repo)
    config = HunYuanMoEV1Config.from_pretrained(model_path)
    plan = None if group is None else make_plan(config, group, pipeline)
    keep = (lambda name: True) if plan is None else plan.keeps
    model = model_class(config)
    weights = model.sanitize(load_safetensors(weight_files(model_path, keep)))
    weights = {name: w for name, w in weights.items() if keep(name)}
    if config.quantization is not None:
        apply_quantization(model, config.quantization, weights)
    check_tensors(
        {name: w.shape for name, w in weights.items()},
        {name: p.shape for name, p in tree_flatten(model.parameters()) if keep(name)},
        f"Checkpoint {model_path} does not match its config",
    )
    weights = cast_floating(weights, dtype)
    size = sum(w.nbytes for w in weights.values())
    if budget is not None and size > budget:
        if group is not None or adapter_path is not None:
            what = "mlx.launch" if group is not None else "--adapter-path (fuse the adapters first)"
            raise ValueError(f"--memory-budget (streamed experts) cannot be combined with {what}")
        weights = {name: w for name, w in weights.items() if not is_routed_expert(name)}
        resident = sum(w.nbytes for w in weights.values())
        stream_experts(model, model_path, budget, resident, dtype)
    elif budget is None and group is None:
        check_fits(model_path, size)
    # A pipeline stage leaves the other layers unloaded: they are dropped below, unevaluated.
    strict = plan is None or plan.mode == "tensor"
    model.load_weights(list(weights.items()), strict=strict)
    del weights
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    if plan is not None and plan.mode == "tensor":
        model.shard(group)
    elif plan is not None:
        model.model.pipeline(group)
    model.eval()
    return model


def evaluate(model: nn.Module, group: mx.distributed.Group | None) -> None:
    """Read the weights, one layer at a time (a progress bar on rank 0)."""
    quiet = group is not None and group.rank() != 0
    for layer in tqdm(model.model.layers, desc="Loading", unit="layer", disable=quiet or None):
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def load(
    path_or_repo: str | Path,
    lazy: bool = False,
    adapter_path: str | Path | None = None,
    dtype: str = DEFAULT_LOAD_DTYPE,
    group: mx.distributed.Group | None = None,
    pipeline: bool = False,
    fast_paths: str | FastPaths = "auto",
    memory_budget: int | str | None = None,
) -> tuple[HunYuanMoEV1ForCausalLM, HunYuanTokenizer]:
    """The model (with adapters, if given; floating parameters as `dtype` says; this rank's share
    with a `group`, see `load_model`; routed experts streamed where the weights exceed
    `memory_budget`) and its tokenizer. The folder is resolved once; one without
    a tokenizer vocabulary (hy.tiktoken or tokenizer.json) is refused, on every rank, after the
    checks of config and weights but before any weight is read. `fast_paths` as `load_model`'s."""
    model_path = resolve_model_path(path_or_repo)
    model = load_model(
        model_path,
        lazy=True,
        adapter_path=adapter_path,
        dtype=dtype,
        group=group,
        pipeline=pipeline,
        fast_paths=fast_paths,
        memory_budget=memory_budget,
    )
    tokenizer = together(group, lambda: HunYuanTokenizer.from_pretrained(model_path))
    if not lazy:
        together(group, lambda: evaluate(model, group))
    return model, tokenizer
