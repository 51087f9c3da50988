"""LoRA adapters for HunYuan: target selection, per-expert LoRA on the gathered experts, adapter
files (save, load, apply to a model) and fusing them back into the weights.

Attention and shared-MLP projections use mlx-lm's `LoRALinear` / `DoRALinear`; the routed experts
use `LoRAGatheredLinear`, whose low-rank factors are stacked per expert and applied with the same
gathered matmul as the base, so a token reaches (and trains) only the experts it was routed to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import dequantize_model as dequantize_mlx_lm_layers

from ..files import check_tensors, read_json
from ..models.experts import (
    GATHERED_LINEARS,
    GatheredLinear,
    QuantizedGatheredLinear,
    Rows,
    pick_experts,
)

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FINE_TUNE_TYPES = ("lora", "dora", "full")

# Module paths inside a decoder layer, by target group. The router (`mlp.gate.wg`) is never a
# target: it stays float32 and small changes to it flip the top-k.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "shared_mlp": (
        "mlp.shared_mlp.gate_proj",
        "mlp.shared_mlp.up_proj",
        "mlp.shared_mlp.down_proj",
    ),
    "experts": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
}
DEFAULT_LORA_TARGETS = ("attention", "shared_mlp", "experts")
# Config fields that decide which adapter tensors exist and their shapes.
BASE_MODEL_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "moe_intermediate_size",
    "intermediate_size",
)
# mlx-lm's defaults.
DEFAULT_LORA_PARAMETERS: dict[str, Any] = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def resolve_targets(targets: list[str] | tuple[str, ...] | str) -> list[str]:
    """Layer-relative module paths for target groups (`attention`, ...) or paths themselves."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    known = [key for keys in LORA_TARGETS.values() for key in keys]
    keys: list[str] = []
    for target in targets:
        if target in LORA_TARGETS:
            keys += LORA_TARGETS[target]
        elif target in known:
            keys.append(target)
        else:
            raise ValueError(
                f"Unknown LoRA target {target!r}; choose groups {', '.join(LORA_TARGETS)} "
                f"or module paths {', '.join(known)}"
            )
    if not keys:
        raise ValueError("No LoRA targets given")
    return list(dict.fromkeys(keys))


class LoRAGatheredLinear(nn.Module):
    """A (quantized) `GatheredLinear` plus a float32 rank-r update `scale * B_e A_e` per expert e.

    `lora_a` is (E, r, in) and `lora_b` (E, out, r), as mlx-lm's `LoRASwitchLinear`; `lora_b`
    starts at zero so the adapted model starts equal to the base.
    """

    def __init__(self, linear: nn.Module, rank: int = 8, dropout: float = 0.0, scale: float = 20.0):
        super().__init__()
        # Wraps the base rather than building a fresh one: an A13B expert stack is gigabytes.
        num_experts, output_dims, input_dims = linear.dims
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (num_experts, rank, input_dims))
        self.lora_b = mx.zeros((num_experts, output_dims, rank))

    def __call__(
        self, x: mx.array, indices: mx.array, sorted_indices: bool = False, lhs_indices: Rows = None
    ) -> mx.array:
        y = self.linear(x, indices, sorted_indices=sorted_indices, lhs_indices=lhs_indices)
        h = self.dropout(x).astype(self.lora_a.dtype)
        # The first product picks x's rows as the base did; its output is one row per index.
        h = mx.gather_mm(
            h, self.lora_a.swapaxes(-1, -2), lhs_indices, indices, sorted_indices=sorted_indices
        )
        h = mx.gather_mm(
            h, self.lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        return y + (self.scale * h).astype(y.dtype)

    @property
    def dims(self) -> tuple[int, int, int]:
        """The base's (num_experts, output_dims, input_dims)."""
        return self.linear.dims

    def batched(self, x: mx.array, experts: list[int] | None = None) -> mx.array:
        """The base's padded-path product (`GatheredLinear.batched`) plus the experts' updates."""
        y = self.linear.batched(x, experts)
        lora_a = pick_experts(self.lora_a, experts).swapaxes(-1, -2)
        lora_b = pick_experts(self.lora_b, experts).swapaxes(-1, -2)
        h = (self.dropout(x).astype(lora_a.dtype) @ lora_a) @ lora_b
        return y + (self.scale * h).astype(y.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base with the update added, re-quantized as the base was unless `dequantize`."""
        weight = self.linear.dense_weight()
        delta = self.scale * (self.lora_b @ self.lora_a)
        fused = GatheredLinear.from_weight((weight.astype(mx.float32) + delta).astype(weight.dtype))
        if isinstance(self.linear, QuantizedGatheredLinear) and not dequantize:
            return fused.to_quantized(self.linear.group_size, self.linear.bits, self.linear.mode)
        return fused


def to_lora(module: nn.Module, parameters: dict[str, Any], use_dora: bool) -> nn.Module:
    """The LoRA (or DoRA) layer wrapping one target module."""
    rank, scale, dropout = parameters["rank"], parameters["scale"], parameters["dropout"]
    if isinstance(module, GATHERED_LINEARS):
        if use_dora:
            raise ValueError(
                "DoRA is not supported on the routed experts: use lora, or leave 'experts' "
                "out of the LoRA targets"
            )
        return LoRAGatheredLinear(module, rank=rank, dropout=dropout, scale=scale)
    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        layer_class = DoRALinear if use_dora else LoRALinear
        return layer_class.from_base(module, r=rank, dropout=dropout, scale=scale)
    raise ValueError(f"Cannot put LoRA on a {type(module).__name__}")


def tuned_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The last `num_layers` decoder layers (all of them for -1), as mlx-lm counts."""
    layers = model.layers
    if num_layers > len(layers):
        raise ValueError(
            f"Asked to tune {num_layers} layers; the model has {len(layers)} "
            f"(use --num-layers {len(layers)}, or -1 for all)"
        )
    return layers if num_layers < 0 else layers[len(layers) - num_layers :]


def prepare_model(
    model: nn.Module,
    fine_tune_type: str,
    num_layers: int,
    lora_parameters: dict[str, Any] | None = None,
) -> int:
    """Freeze the base and make trainable what `fine_tune_type` trains, in place; returns how
    many layers that is.

    lora/dora wrap the targets (`lora_parameters["keys"]`, layer-relative paths) of the last
    `num_layers` layers; full unfreezes those layers whole, which needs unquantized weights.
    """
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"Unknown fine-tune type {fine_tune_type!r}; choose {FINE_TUNE_TYPES}")
    model.freeze()
    layers = tuned_layers(model, num_layers)
    if fine_tune_type == "full":
        for layer in layers:
            if any(name.endswith(".scales") for name, _ in tree_flatten(layer.parameters())):
                raise ValueError("Full fine-tuning needs an unquantized model; use lora or dora")
            layer.unfreeze()
        return len(layers)
    parameters = {**DEFAULT_LORA_PARAMETERS, **(lora_parameters or {})}
    keys = set(resolve_targets(parameters.get("keys") or list(DEFAULT_LORA_TARGETS)))
    for layer in layers:
        replaced = [
            (path, to_lora(module, parameters, fine_tune_type == "dora"))
            for path, module in layer.named_modules()
            if path in keys
        ]
        layer.update_modules(tree_unflatten(replaced))
    return len(layers)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """What an adapter file holds: the trainable parameters."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter_config(config: dict[str, Any], adapter_path: str | Path) -> None:
    """Write `adapter_config.json` (the training options, as mlx-lm writes them)."""
    path = Path(adapter_path)
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, default=str, ensure_ascii=False)
    (path / ADAPTER_CONFIG_FILE).write_text(text + "\n")


def read_adapter_config(adapter_path: str | Path) -> dict[str, Any]:
    """The `adapter_config.json` of an adapter directory."""
    file = Path(adapter_path) / ADAPTER_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No {ADAPTER_CONFIG_FILE} in adapter path {adapter_path}")
    return read_json(file)


def load_adapter_weights(model: nn.Module, file: str | Path) -> None:
    """Load an adapter file into a prepared model; it must fill every trainable parameter."""
    weights = mx.load(str(file))
    check_tensors(
        {name: w.shape for name, w in weights.items()},
        {name: p.shape for name, p in adapter_weights(model).items()},
        f"Adapter file {file} does not match its adapter_config.json",
    )
    model.load_weights(list(weights.items()), strict=False)


def base_model_signature(model: nn.Module) -> dict[str, Any]:
    """The config fields adapters depend on, recorded with them to check the model they meet."""
    return {key: getattr(model.config, key) for key in BASE_MODEL_KEYS}


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply the adapters of a training run (`adapter_config.json` + `adapters.safetensors`)."""
    config = read_adapter_config(adapter_path)
    made_for = config.get("base_model")
    if made_for is not None and made_for != base_model_signature(model):
        theirs = ", ".join(f"{k} {v}" for k, v in made_for.items())
        ours = ", ".join(f"{k} {v}" for k, v in base_model_signature(model).items())
        raise ValueError(
            f"The adapters in {adapter_path} were trained on another model "
            f"({config.get('model')}: {theirs}); this model has {ours}"
        )
    prepare_model(
        model,
        config.get("fine_tune_type", "lora"),
        config["num_layers"],
        config.get("lora_parameters"),
    )
    load_adapter_weights(model, Path(adapter_path) / ADAPTER_FILE)
    model.eval()
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every quantized layer, gathered experts included, back to a plain one, in place."""
    dequantize_mlx_lm_layers(model)
    plain = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedGatheredLinear):
            plain.append((name, GatheredLinear.from_weight(module.dense_weight())))
    if plain:
        model.update_modules(tree_unflatten(plain))
    return model


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every LoRA/DoRA layer into its base weights (and optionally dequantize all)."""
    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    return model
