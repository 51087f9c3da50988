"""Every checkpoint tensor name this project reads, mapped onto the MLX model's names in one place.

Accepted layouts of a layer's experts (`model.layers.N.mlp.experts...`):
- per expert, as the release and transformers' `save_pretrained` write them:
  `experts.E.{gate,up,down}_proj.weight`;
- transformers' fused 3-D parameters: `experts.gate_up_proj` (E, 2I, D),
  `experts.down_proj` (E, D, I);
- mlx-lm's converted model: `switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` (E, ...);
- this project's: `experts.gate_up_proj.{weight,scales,biases}`, `experts.down_proj.{...}`.
`sanitize` turns any of them into the last; it is safe to run on its own output.
"""

from __future__ import annotations

import mlx.core as mx

from .config import HunYuanMoEV1Config
from .quantization import ROUTER_DTYPE

QUANT_SUFFIXES = ("weight", "scales", "biases")


def sanitize(weights: dict[str, mx.array], config: HunYuanMoEV1Config) -> dict[str, mx.array]:
    """Rename and stack checkpoint tensors into this project's names; returns a new dict."""
    weights = {k.replace(".mlp.switch_mlp.", ".mlp.experts."): v for k, v in weights.items()}
    if config.tie_word_embeddings:
        # Tied checkpoints may still carry a head; the embedding is the head either way.
        weights.pop("lm_head.weight", None)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        stack_experts(weights, f"{prefix}.experts", config.layer_num_experts(layer))
        router = f"{prefix}.gate.wg"
        if f"{router}.weight" in weights:
            if config.layer_num_experts(layer) == 1:
                # Softmax over one expert is 1: the router has no effect, so no module holds it.
                for suffix in QUANT_SUFFIXES:
                    weights.pop(f"{router}.{suffix}", None)
            elif f"{router}.scales" not in weights:  # a quantized one (mlx-lm's) stays packed
                weights[f"{router}.weight"] = weights[f"{router}.weight"].astype(ROUTER_DTYPE)
    return weights


def stack_experts(weights: dict[str, mx.array], prefix: str, num_experts: int) -> None:
    """Bring one layer's experts under `prefix` (`...mlp.experts`) to the fused stacked layout."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for suffix in QUANT_SUFFIXES:
            names = [f"{prefix}.{e}.{proj}.{suffix}" for e in range(num_experts)]
            if names[0] in weights:
                weights[f"{prefix}.{proj}.{suffix}"] = mx.stack([_pop(weights, n) for n in names])
    for proj in ("gate_up_proj", "down_proj"):
        if f"{prefix}.{proj}" in weights:  # transformers' bare 3-D parameters
            weights[f"{prefix}.{proj}.weight"] = weights.pop(f"{prefix}.{proj}")
    for suffix in QUANT_SUFFIXES:
        gate = f"{prefix}.gate_proj.{suffix}"
        if gate in weights:
            # Rows are independent, so quantized weights, scales and biases concatenate alike.
            up = _pop(weights, f"{prefix}.up_proj.{suffix}")
            weights[f"{prefix}.gate_up_proj.{suffix}"] = mx.concatenate(
                [weights.pop(gate), up], axis=1
            )


def _pop(weights: dict[str, mx.array], name: str) -> mx.array:
    if name not in weights:
        raise ValueError(f"Checkpoint is missing tensor {name!r}")
    return weights.pop(name)
