"""Rotary position embedding in the four flavours HunYuan configs use, on top of `mx.fast.rope`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import HunYuanMoEV1Config


class HunYuanMoEV1RotaryEmbedding(nn.Module):
    """Rotate the first half of each head against the second (transformers' `rotate_half`).

    - default: base `rope_theta`.
    - linear: positions divided by `factor`.
    - dynamic NTK (`factor`): past `max_position_embeddings` the base grows with the sequence
      length, recomputed per call from `offset + length` as transformers does while it grows.
    - NTK-alpha (`dynamic` with `alpha`, the release): base `theta * alpha ** (d / (d - 2))`,
      fixed for every length.
    """

    def __init__(self, config: HunYuanMoEV1Config):
        super().__init__()
        self.dims = config.head_dim
        self.base = config.rope_theta
        self.scale = 1.0
        self.dynamic_factor = None
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        if "alpha" in scaling:
            self.base = self.base * scaling["alpha"] ** (self.dims / (self.dims - 2))
        elif config.rope_type == "linear":
            self.scale = 1.0 / scaling["factor"]
        elif config.rope_type == "dynamic":
            self.dynamic_factor = scaling["factor"]

    def base_for_length(self, seq_len: int) -> float:
        """The RoPE base used when the sequence so far has `seq_len` positions."""
        if self.dynamic_factor is None or seq_len <= self.max_position_embeddings:
            return self.base
        factor, max_len = self.dynamic_factor, self.max_position_embeddings
        return self.base * ((factor * seq_len / max_len) - (factor - 1)) ** (
            self.dims / (self.dims - 2)
        )

    def __call__(
        self, x: mx.array, offset: int = 0, position_ids: mx.array | None = None
    ) -> mx.array:
        """Rotate x (B, heads, L, head_dim) for positions offset.. or the given (B, L) positions."""
        if position_ids is None:
            base = self.base_for_length(offset + x.shape[-2])
            return mx.fast.rope(
                x, self.dims, traditional=False, base=base, scale=self.scale, offset=offset
            )
        base = self.base_for_length(int(position_ids.max().item()) + 1)
        inv_freq = 1.0 / (base ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims))
        angles = (position_ids.astype(mx.float32) * self.scale)[:, None, :, None] * inv_freq
        cos, sin = mx.cos(angles), mx.sin(angles)
        x1, x2 = mx.split(x.astype(mx.float32), 2, axis=-1)
        rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return rotated.astype(x.dtype)
