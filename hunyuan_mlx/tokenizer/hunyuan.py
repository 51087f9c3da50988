"""The Hunyuan-A13B tokenizer: the released byte-level BPE (`hy.tiktoken`) and chat template.

It reproduces Tencent's `HYTokenizer` (ids, NFC normalisation, special tokens written in text,
UTF-8 decoding with replacement) without running any code shipped with a checkpoint.

Use with mlx-lm: wrap it with `HunYuanTokenizer.for_mlx_lm()`, which returns mlx-lm's own
`TokenizerWrapper` holding this tokenizer and `HunYuanStreamingDetokenizer`; pass that wrapper to
`mlx_lm.generate.stream_generate`. mlx-lm's default (naive) detokenizer also works but is quadratic.
"""

from __future__ import annotations

import base64
import codecs
import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from ..files import read_json

TIKTOKEN_FILE = "hy.tiktoken"
TOKENIZER_JSON_FILE = "tokenizer.json"

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The release numbers these right after the ordinary tokens, in this order.
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (
    "<|endoftext|>",
    "<|startoftext|>",
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
) + tuple(f"<|extra_{i}|>" for i in range(205))


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a `base64(token) rank` file the way the release does: ranks follow line order and a
    repeated token is skipped (so the file's own rank column is ignored)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            token = base64.b64decode(line.split()[0])
            if token not in ranks:
                ranks[token] = len(ranks)
    return ranks


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by `tokenizer.json` vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _token_name(value: Any) -> str | None:
    """Token strings in tokenizer_config.json may be plain or serialised AddedToken dicts."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class HunYuanStreamingDetokenizer:
    """Streaming detokenizer with mlx-lm's interface that holds back incomplete UTF-8 sequences.

    Feeding every token and calling `finalize()` gives exactly `tokenizer.decode(tokens)`; no
    segment ever carries a replacement character caused by a character split across tokens.
    """

    def __init__(self, tokenizer: HunYuanTokenizer) -> None:
        self._token_bytes = tokenizer.token_bytes
        self.reset()

    def reset(self) -> None:
        """Drop all streaming state (mlx-lm copies one instance and resets it per request)."""
        self.offset = 0
        self.tokens: list[int] = []
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token: int) -> None:
        """Consume one token id; complete characters become visible in `text` at once."""
        self.tokens.append(token)
        self.text += self._decoder.decode(self._token_bytes[token])

    def finalize(self) -> None:
        """Flush a trailing incomplete sequence as U+FFFD, as `decode` would."""
        self.text += self._decoder.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        """The text added since the previous access."""
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment


class HunYuanTokenizer:
    """The released Hunyuan-A13B tokenizer with an HF-like surface (encode, decode, chat template).

    Build it with `from_pretrained(directory)`. Encoding runs on `tiktoken` (from `hy.tiktoken`) or
    on the `tokenizers` library (from `tokenizer.json`); both give the release's ids.
    """

    def __init__(
        self,
        encode_fn: Callable[[str], list[int]],
        token_bytes: list[bytes],
        special_tokens: Mapping[str, int],
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._encode_fn = encode_fn
        self.token_bytes = token_bytes
        self.special_tokens = dict(special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        config = dict(tokenizer_config or {})
        generation = dict(generation_config or {})
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token: str | None = _token_name(config.get("bos_token"))
        self.eos_token: str | None = _token_name(config.get("eos_token"))
        self.pad_token: str | None = _token_name(config.get("pad_token"))
        self.eos_token_id = self.special_tokens.get(self.eos_token) if self.eos_token else None
        self.bos_token_id = self.special_tokens.get(self.bos_token) if self.bos_token else None
        pad_id = self.special_tokens.get(self.pad_token) if self.pad_token else None
        self.pad_token_id: int | None = (
            pad_id if pad_id is not None else generation.get("pad_token_id")
        )
        eos = generation.get("eos_token_id", self.eos_token_id)
        self.eos_token_ids: list[int] = (
            [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
        )

    @classmethod
    def from_tiktoken(
        cls,
        path: str | Path,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> HunYuanTokenizer:
        """Build on `tiktoken` from a `hy.tiktoken` file; the 210 specials follow its ids."""
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        encoding = tiktoken.Encoding(
            "hunyuan", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special
        )
        token_bytes = list(ranks) + [name.encode() for name in SPECIAL_TOKEN_NAMES]

        def encode(text: str) -> list[int]:
            return encoding.encode(text, allowed_special="all", disallowed_special=())

        return cls(encode, token_bytes, special, tokenizer_config, generation_config)

    @classmethod
    def from_tokenizer_json(
        cls,
        path: str | Path,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> HunYuanTokenizer:
        """Build on the `tokenizers` library from a byte-level BPE `tokenizer.json`."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(
                f"{path} needs the `tokenizers` package (pip install tokenizers), "
                f"or put the release's {TIKTOKEN_FILE} beside it to use tiktoken instead"
            ) from e
        backend = Tokenizer.from_file(str(path))
        added = backend.get_added_tokens_decoder()
        special = {tok.content: i for i, tok in added.items() if tok.special}
        byte_of = {c: b for b, c in bytes_to_unicode().items()}

        def token_bytes_of(i: int) -> bytes:
            if i in added:
                return added[i].content.encode()
            return bytes(byte_of[c] for c in backend.id_to_token(i))

        token_bytes = [
            token_bytes_of(i) for i in range(backend.get_vocab_size(with_added_tokens=True))
        ]

        def encode(text: str) -> list[int]:
            return backend.encode(text, add_special_tokens=False).ids

        return cls(encode, token_bytes, special, tokenizer_config, generation_config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HunYuanTokenizer:
        """Load from a checkpoint directory: `hy.tiktoken` (preferred) or `tokenizer.json`, plus
        `tokenizer_config.json` (template, special-token names) and `generation_config.json`."""
        directory = Path(path)
        config, generation = (
            read_json(file) if file.is_file() else {}
            for file in (directory / "tokenizer_config.json", directory / "generation_config.json")
        )
        if (directory / TIKTOKEN_FILE).is_file():
            return cls.from_tiktoken(directory / TIKTOKEN_FILE, config, generation)
        if (directory / TOKENIZER_JSON_FILE).is_file():
            return cls.from_tokenizer_json(directory / TOKENIZER_JSON_FILE, config, generation)
        raise FileNotFoundError(
            f"no tokenizer vocabulary in {directory}: "
            f"expected {TIKTOKEN_FILE} or {TOKENIZER_JSON_FILE}"
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (128167 for the release)."""
        return len(self.token_bytes)

    def __len__(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids.

        `add_special_tokens` is accepted for HF/mlx-lm compatibility and adds nothing: the release
        adds no BOS or EOS (its chat template writes `<|startoftext|>` itself).
        """
        return self._encode_fn(unicodedata.normalize("NFC", text))

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, decoding UTF-8 with U+FFFD for invalid or incomplete bytes."""
        if isinstance(ids, int):
            ids = [ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(
        self, tokens: str | bytes | Sequence[str | bytes]
    ) -> int | None | list[int | None]:
        """Id (or list of ids) of special-token names or ordinary tokens' bytes; None if unknown."""
        if isinstance(tokens, (str, bytes)):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_id(self, token: str | bytes) -> int | None:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        return self._ordinary_ids.get(token.encode() if isinstance(token, str) else token)

    @cached_property
    def _ordinary_ids(self) -> dict[bytes, int]:
        return {b: i for i, b in enumerate(self.token_bytes) if i not in self._special_ids}

    def get_vocab(self) -> dict[bytes | str, int]:
        """Ordinary tokens keyed by their bytes (as in the release), special tokens by name."""
        return {**self._ordinary_ids, **self.special_tokens}

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render the checkpoint's own jinja2 chat template (sandboxed) and optionally encode it.

        The release's template ignores `add_generation_prompt`; `enable_thinking=False` makes it
        append an empty `<think>\\n\\n</think>\\n` block. Extra keyword arguments become template
        variables, as in transformers.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json)")
        # mlx-lm's TokenizerWrapper passes return_dict=False; we always return ids or text.
        kwargs.pop("return_dict", None)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compile_template(self.chat_template).render(
            messages=plain,
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )
        return self.encode(text) if tokenize else text

    @property
    def detokenizer(self) -> HunYuanStreamingDetokenizer:
        """A fresh streaming detokenizer for one generation."""
        return HunYuanStreamingDetokenizer(self)

    def for_mlx_lm(self) -> Any:
        """This tokenizer in mlx-lm's `TokenizerWrapper`, ready for `stream_generate`.

        mlx-lm finds no single `<think>` token here, so the wrapper's `apply_chat_template` passes
        `enable_thinking=False` unless told otherwise: pass it explicitly, or build the prompt
        with this class's `apply_chat_template`.
        """
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        return TokenizerWrapper(self, HunYuanStreamingDetokenizer, eos_token_ids=self.eos_token_ids)


@lru_cache(maxsize=4)
def _compile_template(source: str) -> Any:
    """Compile a chat template the way transformers does, in jinja2's immutable sandbox."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja2's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
