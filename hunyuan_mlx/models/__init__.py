"""The HunYuan MoE V1 model: config, layers, gathered experts, fast paths, checkpoint names."""

from .config import HunYuanMoEV1Config
from .fast_paths import FastPaths
from .hunyuan import (
    HunYuanMoEV1ForCausalLM,
    HunYuanMoEV1ForSequenceClassification,
    HunYuanMoEV1Model,
)

__all__ = [
    "FastPaths",
    "HunYuanMoEV1Config",
    "HunYuanMoEV1ForCausalLM",
    "HunYuanMoEV1ForSequenceClassification",
    "HunYuanMoEV1Model",
]
