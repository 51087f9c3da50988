"""KV caches of earlier requests, kept so that a request sharing a prefix with one of them (the
next turn of a conversation) prefills only the tokens after it.

This is mlx-lm's `LRUPromptCache` (a token trie; least recently used evicted, bounded by count and
bytes; a longer cached sequence is trimmed to the shared prefix) with the bookkeeping a server
needs around it. Like the model, it is used from the engine's thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

DEFAULT_PROMPT_CACHE_SIZE = 10  # mlx-lm server's --prompt-cache-size
MODEL_KEY = "model"  # one model per server


class PromptCache:
    """Longest-prefix lookup of KV caches by token ids, at most `max_size` of them and
    `max_bytes` in all (None: no byte limit)."""

    def __init__(
        self, max_size: int = DEFAULT_PROMPT_CACHE_SIZE, max_bytes: int | None = None
    ) -> None:
        if max_size < 0:
            raise ValueError(f"prompt cache size must be >= 0, got {max_size}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"prompt cache bytes must be >= 0, got {max_bytes}")
        self.max_size = max_size
        self._lru = LRUPromptCache(max_size, 1 << 63 if max_bytes is None else max_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        """Bytes of the KV caches held."""
        return self._lru.nbytes

    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any] | None, int]:
        """(a copy of the cache holding the longest cached prefix of `tokens`, its length); at
        least one token is left to run, since generation starts from the last one. (None, 0)
        when nothing is cached."""
        cache, rest = self._lru.fetch_nearest_cache(MODEL_KEY, list(tokens))
        if cache is None:
            return None, 0
        if not rest:
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            return cache, len(tokens) - 1
        return cache, len(tokens) - len(rest)

    def insert(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep `cache`, which holds exactly `tokens`; one that does not is dropped."""
        if self.max_size == 0 or cache[0].offset != len(tokens):
            return
        self._lru.insert_cache(MODEL_KEY, list(tokens), cache)
