"""Which modules are quantized, and how: the `quantization` block of a converted config.json.

The block follows mlx-lm: global `group_size`, `bits` and `mode`, and optionally one entry per
module path, either a dict of the same keys (a different precision) or `false` (kept unquantized).
Norms have nothing to quantize and the router `gate.wg` is never quantized.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

QUANT_KEYS = ("group_size", "bits", "mode")


def is_quantizable(path: str, module: nn.Module) -> bool:
    """A module MLX can quantize, other than the router (small logit errors flip the top-k)."""
    return hasattr(module, "to_quantized") and not path.endswith("gate.wg")


def module_params(path: str, quantization: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization parameters of one module path, or None if it stays unquantized."""
    entry = quantization.get(path, True)
    if entry is False:
        return None
    params = {k: quantization[k] for k in QUANT_KEYS if k in quantization}
    if isinstance(entry, dict):
        params.update({k: entry[k] for k in QUANT_KEYS if k in entry})
    params.setdefault("mode", "affine")
    return params


def apply_quantization(
    model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array] | None = None
) -> None:
    """Swap modules for quantized ones as `quantization` says, in place.

    With `weights` (a quantized checkpoint about to be loaded), only modules whose `scales` the
    checkpoint carries are swapped, so the modules match the file exactly.
    """

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not is_quantizable(path, module):
            return False
        if weights is not None and f"{path}.scales" not in weights:
            return False
        return module_params(path, quantization) or False

    nn.quantize(model, class_predicate=predicate)
