"""`GenerationSettings`: length, sampling and KV cache of a generation, with the checkpoint's
sampling defaults from its generation_config.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm.generate import DEFAULT_MAX_TOKENS as GENERATE_MAX_TOKENS
from mlx_lm.generate import (
    DEFAULT_MIN_P,
    DEFAULT_PREFILL_STEP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
)
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import LogitsProcessor, Sampler, make_logits_processors, make_sampler

from ..files import read_json
from ..models import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_REPETITION_CONTEXT_SIZE = 20  # mlx-lm's make_logits_processors default
DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports
KV_GROUP_SIZES = (32, 64, 128)
ROTATING_CACHE_KEEP = 4  # mlx-lm keeps the first tokens of a rotating cache (attention sink)
# generation_config.json key -> GenerationSettings field
SAMPLING_KEYS = {
    "temperature": "temp",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: length, sampling and KV cache; defaults are mlx-lm's (greedy)."""

    max_tokens: int = GENERATE_MAX_TOKENS
    temp: float = DEFAULT_TEMP
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repetition_penalty: float | None = None
    repetition_context_size: int = DEFAULT_REPETITION_CONTEXT_SIZE
    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens > 0 or self.max_tokens == -1, "max_tokens must be > 0 (or -1)"),
            (self.temp >= 0, "temp must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (
                self.repetition_penalty is None or self.repetition_penalty > 0,
                "repetition_penalty must be > 0",
            ),
            (self.repetition_context_size > 0, "repetition_context_size must be > 0"),
            (self.max_kv_size is None or self.max_kv_size > 0, "max_kv_size must be > 0"),
            (self.kv_bits is None or self.kv_bits in KV_BITS, f"kv_bits must be one of {KV_BITS}"),
            (
                self.kv_group_size in KV_GROUP_SIZES,
                f"kv_group_size must be one of {KV_GROUP_SIZES}",
            ),
            (self.quantized_kv_start >= 0, "quantized_kv_start must be >= 0"),
            (self.prefill_step_size > 0, "prefill_step_size must be > 0"),
            # mlx-lm cannot quantize a rotating cache.
            (
                self.kv_bits is None or self.max_kv_size is None,
                "kv_bits cannot be combined with max_kv_size",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid generation setting: {message}")

    @classmethod
    def from_checkpoint(cls, model_path: str | Path, **overrides: Any) -> GenerationSettings:
        """Sampling from the checkpoint's generation_config.json; non-None overrides win."""
        file = Path(model_path) / GENERATION_CONFIG_FILE
        values: dict[str, Any] = {}
        if file.is_file():
            config = read_json(file)
            values = {f: config[k] for k, f in SAMPLING_KEYS.items() if config.get(k) is not None}
            # As in transformers, whose GenerationConfig is greedy unless do_sample is true.
            if not config.get("do_sample", False):
                values["temp"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def sampler(self) -> Sampler:
        """mlx-lm's sampler for these settings (greedy at temp 0)."""
        return make_sampler(self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> list[LogitsProcessor]:
        """mlx-lm's repetition penalty, when one is set."""
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
        )

    def make_cache(self, model: HunYuanMoEV1ForCausalLM) -> list[Any]:
        """A fresh KV cache: rotating when `max_kv_size` is set (the model's own is unbounded)."""
        if self.max_kv_size is None:
            return make_prompt_cache(model)
        return [
            RotatingKVCache(max_size=self.max_kv_size, keep=ROTATING_CACHE_KEEP)
            for _ in model.layers
        ]

    def check_kv_quantization(self, config: HunYuanMoEV1Config) -> None:
        """Refuse a KV cache quantization that the model's heads cannot take, before it loads
        (`mx.quantize` groups run along the head dimension)."""
        head_dim = config.head_dim
        if self.kv_bits is None or head_dim % self.kv_group_size == 0:
            return
        fitting = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
        hint = f"one of {fitting}" if fitting else "no KV cache quantization (--kv-bits)"
        raise ValueError(
            f"Invalid generation setting: kv_group_size {self.kv_group_size} does not divide the "
            f"model's head_dim {head_dim}; it takes {hint}"
        )

    def check_prompt_fits(self, n_tokens: int, model: HunYuanMoEV1ForCausalLM) -> None:
        """Refuse a prompt longer than the model's context or the `max_kv_size` window."""
        limit = model.config.max_position_embeddings
        source = "the model's max_position_embeddings"
        if self.max_kv_size is not None and self.max_kv_size < limit:
            limit, source = self.max_kv_size, "max_kv_size"
        if n_tokens > limit:
            raise ValueError(f"The prompt has {n_tokens} tokens, more than {limit} ({source})")


