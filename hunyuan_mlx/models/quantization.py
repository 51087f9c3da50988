"""Quantization in one place: the modes and their defaults, the checked parameters, the recipes,
the router rule, and the `quantization` block of a converted config.json.

The block follows mlx-lm: global `group_size`, `bits` and `mode`, and optionally one entry per
module path, either a dict of the same keys (a different precision) or `false` (kept unquantized).
Norms have nothing to quantize. The router is the one rule apart: `is_router`, `ROUTER_DTYPE`.
A new MLX mode is one entry of `Q_MODE_DEFAULTS` (and of `PACKED_DTYPES` if it stores its
arrays in another type).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

QUANT_KEYS = ("group_size", "bits", "mode")
# Quantization mode -> its default (group_size, bits), as mlx-lm.
Q_MODE_DEFAULTS: dict[str, tuple[int, int]] = {
    "affine": (64, 4),
    "mxfp4": (32, 4),
    "nvfp4": (16, 4),
    "mxfp8": (32, 8),
}
DEFAULT_Q_MODE = "affine"
# The non-float arrays of a quantized module: the packed weight is uint32; the scales of the
# mx* / nv* modes are uint8 (affine scales and biases are floats).
PACKED_DTYPES = {"weight": mx.uint32, "scales": mx.uint8}
QUANTIZE_BLOCK_ELEMENTS = 2**24  # weights quantized per evaluation (64 MB of float32)
# The MoE router (`mlp.gate.wg`) is kept in float32 and never quantized, whatever the rest of the
# model is: small errors in its logits flip the top-k choice of experts. A checkpoint that
# quantized it (mlx-lm's `convert -q` does) is loaded as it is; `ROUTER_NOTE` says what it costs.
ROUTER_DTYPE = mx.float32
ROUTER_NOTE = (
    "note: {path} has a quantized MoE router (mlx-lm's convert -q quantizes it): its rounded "
    "logits send some tokens to other experts than the original weights do, which costs accuracy; "
    "`python -m hunyuan_mlx.convert -q` from the original weights keeps the router in float32"
)

# Recipe name -> bits of everything but the routed experts (None: the same as the experts).
# Routed experts hold over 90% of the weights, so keeping attention, the shared expert and the
# embedding (also the head when tied) at higher precision costs little size.
QUANT_RECIPES: dict[str, int | None] = {"uniform": None, "mixed_6": 6, "mixed_8": 8}
DEFAULT_QUANT_RECIPE = "uniform"
# mlx-lm's --quant-predicate recipes (mlx_lm.convert 0.32): X bits everywhere, Y bits for v_proj and
# down_proj of a third of the layers and for lm_head. None gives the modules the precision one of
# ours does, so each is refused with the nearest recipe here.
MLX_LM_RECIPES = {"mixed_2_6": 2, "mixed_3_4": 3, "mixed_3_6": 3, "mixed_4_6": 4}


def is_router(path: str) -> bool:
    """The router's module path, or one of its tensors' names."""
    return path.endswith(".gate.wg") or path.endswith(".gate.wg.weight")


def is_quantizable(path: str, module: nn.Module) -> bool:
    """A module MLX can quantize, other than the router."""
    return hasattr(module, "to_quantized") and not is_router(path)


def is_routed_expert(path: str) -> bool:
    """The stacked routed experts of a MoE layer (not the shared MLP, not the router)."""
    return ".mlp.experts." in path


def is_packed(name: str, dtype: mx.Dtype) -> bool:
    """A quantized module's tensor `name` stored as `PACKED_DTYPES` says (not as a float)."""
    packed = PACKED_DTYPES.get(name.rsplit(".", 1)[-1])
    return packed is not None and packed == dtype


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


def check_quant_params(params: dict[str, Any]) -> None:
    """Raise a ValueError if MLX cannot quantize with these bits, group size and mode."""
    try:
        mx.eval(mx.quantize(mx.zeros((1, 2 * 128)), **params))
    except (ValueError, RuntimeError) as e:
        raise ValueError(
            f"MLX cannot quantize with bits={params['bits']}, group_size={params['group_size']}, "
            f"mode={params['mode']!r}: {e}"
        ) from None


def recipe_params(recipe: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters `recipe` gives module `path`; `params` are those of the routed experts."""
    if recipe in MLX_LM_RECIPES:
        raise ValueError(
            f"{recipe} is an mlx-lm recipe (higher bits for v_proj/down_proj of some layers), "
            f"which this converter does not have; the nearest here is "
            f"--q-bits {MLX_LM_RECIPES[recipe]} --quant-recipe mixed_6 (routed experts at "
            f"{MLX_LM_RECIPES[recipe]} bits, the rest at 6)"
        )
    if recipe not in QUANT_RECIPES:
        raise ValueError(f"Unknown quant recipe {recipe!r}; choose from {', '.join(QUANT_RECIPES)}")
    high_bits = QUANT_RECIPES[recipe]
    if high_bits is None or is_routed_expert(path):
        return params
    if params.get("mode", DEFAULT_Q_MODE) != "affine":
        raise ValueError(f"Quant recipe {recipe!r} supports only the affine mode")
    return {**params, "bits": max(high_bits, params["bits"])}


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


def dequantize(
    weight: mx.array, scales: mx.array, biases: mx.array | None, params: dict[str, Any]
) -> mx.array:
    """`mx.dequantize` with a module's quantization parameters (`module_params`)."""
    kwargs = {k: params[k] for k in QUANT_KEYS if k in params}
    return mx.dequantize(weight, scales, biases, **kwargs)


def module_params(path: str, quantization: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization parameters of one module path, or None if it stays unquantized."""
    entry = quantization.get(path, True)
    if entry is False:
        return None
    params = {k: quantization[k] for k in QUANT_KEYS if k in quantization}
    if isinstance(entry, dict):
        params.update({k: entry[k] for k in QUANT_KEYS if k in entry})
    params.setdefault("mode", DEFAULT_Q_MODE)
    return params


def apply_quantization(
    model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array] | None = None
) -> None:
    """Swap modules for quantized ones as `quantization` says, in place.

    With `weights` (a quantized checkpoint about to be loaded), exactly the modules whose
    `scales` the checkpoint carries are swapped, so the modules match the file: the router too
    where the checkpoint quantized it (see `ROUTER_NOTE`).
    """

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if weights is not None:
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
                return False
        elif not is_quantizable(path, module):
            return False
        return module_params(path, quantization) or False

    nn.quantize(model, class_predicate=predicate)


def has_quantized_router(model: nn.Module) -> bool:
    """Whether a loaded model's router is quantized (its checkpoint's choice, `ROUTER_NOTE`)."""
    return any(
        is_router(path) and isinstance(module, nn.QuantizedLinear)
        for path, module in model.named_modules()
    )
