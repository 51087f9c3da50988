"""hunyuan-mlx: Tencent's HunYuan MoE V1 (Hunyuan-A13B) on MLX."""

from .config import HunYuanMoEV1Config
from .converter import convert
from .loading import load, load_model
from .model import (
    HunYuanMoEV1ForCausalLM,
    HunYuanMoEV1ForSequenceClassification,
    HunYuanMoEV1Model,
)

__version__ = "0.1.0"

__all__ = [
    "HunYuanMoEV1Config",
    "HunYuanMoEV1ForCausalLM",
    "HunYuanMoEV1ForSequenceClassification",
    "HunYuanMoEV1Model",
    "convert",
    "load",
    "load_model",
]
