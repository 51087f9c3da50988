"""`HunYuanMoEV1Config`: the model's hyper-parameters, read from any of the three config.json kinds.

The fields and defaults are those of transformers' `HunYuanMoEV1Config`, plus the fields of the
original Hunyuan-A13B release (`model_type: "hunyuan"`) that change the architecture. Each field
has one name: the release's `attention_head_dim` is read as `head_dim`, and transformers 5's
`rope_parameters` is read as `rope_theta` + `rope_scaling`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "hunyuan_v1_moe"
ROPE_TYPES = ("default", "linear", "dynamic")
CLASSIFICATION_PROBLEM_TYPES = (
    "regression",
    "single_label_classification",
    "multi_label_classification",
)


def read_json(path: str | Path) -> Any:
    """The parsed JSON file; invalid JSON is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


@dataclass
class HunYuanMoEV1Config:
    """Hyper-parameters of a HunYuan MoE V1 model, validated on construction."""

    vocab_size: int = 290943
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    eod_token_id: int | None = 3
    sep_token_id: int | None = 4
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # {"type": "linear" | "dynamic", "factor": float} or {"type": "dynamic", "alpha": float}
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_experts: int | list[int] = 1
    moe_topk: int | list[int] = 1
    head_dim: int | None = None
    # Fields of the original release (absent from transformers, which behaves as their defaults).
    moe_intermediate_size: int | list[int] | None = None  # None: intermediate_size
    num_shared_expert: int | list[int] = 1
    use_mixed_mlp_moe: bool = True  # add the shared MLP to the routed experts
    use_qk_norm: bool = True
    use_cla: bool = False  # cross-layer attention: layers share K/V in groups of cla_share_factor
    cla_share_factor: int = 1
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1
    # Sequence classification.
    num_labels: int = 2
    problem_type: str | None = None
    # MLX quantization of a converted checkpoint (quantization.py); None when unquantized.
    quantization: dict[str, Any] | None = None
    model_type: str = MODEL_TYPE
    # Keys of the source config.json that this project does not use, kept for saving back.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self._validate()

    # Per-layer views of the fields that may be an int or a per-layer list.
    def layer_num_experts(self, layer_idx: int) -> int:
        return _per_layer(self.num_experts, layer_idx)

    def layer_moe_topk(self, layer_idx: int) -> int:
        return _per_layer(self.moe_topk, layer_idx)

    def layer_moe_intermediate_size(self, layer_idx: int) -> int:
        return _per_layer(self.moe_intermediate_size, layer_idx)

    def layer_num_shared_expert(self, layer_idx: int) -> int:
        return _per_layer(self.num_shared_expert, layer_idx)

    def layer_has_kv_proj(self, layer_idx: int) -> bool:
        """With CLA, only the first layer of each group computes keys and values."""
        return not self.use_cla or layer_idx % self.cla_share_factor == 0

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["type"]

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "cla_share_factor",
            "num_labels",
        ):
            _check_positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("num_experts", "moe_topk", "moe_intermediate_size", "num_shared_expert"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_hidden_layers:
                raise ValueError(
                    f"{name} has {len(value)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}"
                )
            for v in value if isinstance(value, list) else [value]:
                # A layer may have no shared expert; every other size must be positive.
                if name == "num_shared_expert":
                    if not isinstance(v, int) or v < 0:
                        raise ValueError(f"num_shared_expert must be a non-negative int, got {v!r}")
                else:
                    _check_positive(name, v)
        for i in range(self.num_hidden_layers):
            if self.layer_moe_topk(i) > self.layer_num_experts(i):
                raise ValueError(
                    f"moe_topk ({self.layer_moe_topk(i)}) is larger than num_experts "
                    f"({self.layer_num_experts(i)}) in layer {i}"
                )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.problem_type is not None and self.problem_type not in CLASSIFICATION_PROBLEM_TYPES:
            raise ValueError(
                f"problem_type must be one of {CLASSIFICATION_PROBLEM_TYPES}, "
                f"got {self.problem_type!r}"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> HunYuanMoEV1Config:
        """Read a release, transformers 5 or hunyuan-mlx config dict; unknown keys go to `extra`."""
        config = dict(config)
        if "attention_head_dim" in config:
            head_dim = config.pop("attention_head_dim")
            config.setdefault("head_dim", head_dim)
        rope_parameters = config.pop("rope_parameters", None)
        if rope_parameters is not None:
            config["rope_theta"], config["rope_scaling"] = _from_rope_parameters(rope_parameters)
        if config.get("rope_theta") is None:
            config.pop("rope_theta", None)
        if isinstance(config.get("id2label"), dict) and "num_labels" not in config:
            config["num_labels"] = len(config["id2label"])
        # The release calls its architecture "hunyuan"; both describe the same model.
        config["model_type"] = MODEL_TYPE
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HunYuanMoEV1Config:
        """Read `config.json` from a checkpoint directory."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"No config.json in {path}")
        return cls.from_dict(read_json(file))

    def to_dict(self) -> dict[str, Any]:
        """The config as saved by this project: the extra keys, then every field."""
        out = dict(self.extra)
        out.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        )
        if out["quantization"] is None:
            del out["quantization"]
        return out

    def save_pretrained(self, path: str | Path) -> None:
        Path(path, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _per_layer(value: int | list[int], layer_idx: int) -> int:
    return value[layer_idx] if isinstance(value, list) else value


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normalise_rope_scaling(scaling: dict[str, Any]) -> dict[str, Any] | None:
    """`type` plus the source's keys; `alpha` makes a `dynamic` RoPE fixed NTK-alpha.

    Keys this project does not use (`beta_fast`, `mscale`, a `factor` beside `alpha`, ...) are
    kept, so that a saved config still reads in transformers, which requires some of them.
    """
    rope_type = scaling.get("type", scaling.get("rope_type"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return None
    out = {"type": rope_type}
    out.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type")})
    if rope_type == "dynamic" and out.get("alpha") is not None:
        if not isinstance(out["alpha"], (int, float)) or out["alpha"] <= 0:
            raise ValueError(f"rope_scaling alpha must be positive, got {out['alpha']!r}")
        out["alpha"] = float(out["alpha"])
        return out
    factor = out.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"rope_scaling type {rope_type!r} needs a positive factor, got {factor!r}")
    out["factor"] = float(factor)
    return out


def _from_rope_parameters(params: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """transformers 5 `rope_parameters` -> (`rope_theta`, `rope_scaling`)."""
    params = dict(params)
    theta = params.pop("rope_theta", None)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    return theta, {"type": rope_type, **params}
