"""Convert the release's `hy.tiktoken` to a Hugging Face `tokenizer.json` (plain JSON writing).

The layout follows transformers' `TikTokenConverter`: a byte-level BPE with `ignore_merges`,
merges recovered from the ranks, the release's split regex, and the 210 special tokens as added
tokens. The `tokenizers` package is not needed to write it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .hunyuan import PAT_STR, SPECIAL_TOKEN_NAMES, bytes_to_unicode, load_tiktoken_ranks


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's ranks: every split of a token into two known tokens,
    ordered by the merged token's rank, then by the ranks of the two halves."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def tokenizer_json_dict(ranks: dict[bytes, int]) -> dict[str, Any]:
    """The `tokenizer.json` content for `ranks` plus the release's special tokens."""
    byte_map = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    first_special = len(ranks)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": first_special + i,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, name in enumerate(SPECIAL_TOKEN_NAMES)
        ],
        # The release NFC-normalises text before encoding.
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": PAT_STR},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {**byte_level, "use_regex": False},
            ],
        },
        "post_processor": {**byte_level, "trim_offsets": False, "use_regex": False},
        "decoder": {**byte_level, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {to_str(token): rank for token, rank in ranks.items()},
            "merges": [[to_str(a), to_str(b)] for a, b in tiktoken_merges(ranks)],
        },
    }


def write_tokenizer_json(tiktoken_path: str | Path, out_path: str | Path) -> Path:
    """Write `out_path` (a `tokenizer.json`) equivalent to the `hy.tiktoken` at `tiktoken_path`."""
    content = tokenizer_json_dict(load_tiktoken_ranks(tiktoken_path))
    out = Path(out_path)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(content, f, ensure_ascii=False)
    return out
