"""The release's tokenizer (`hy.tiktoken`, no remote code) and its `tokenizer.json` writer."""

from .hunyuan import (
    TIKTOKEN_FILE,
    TOKENIZER_JSON_FILE,
    HunYuanStreamingDetokenizer,
    HunYuanTokenizer,
)
from .tokenizer_json import write_tokenizer_json

__all__ = [
    "TIKTOKEN_FILE",
    "TOKENIZER_JSON_FILE",
    "HunYuanStreamingDetokenizer",
    "HunYuanTokenizer",
    "write_tokenizer_json",
]
