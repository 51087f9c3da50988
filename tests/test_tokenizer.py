"""The tokenizer against a plain tiktoken reference built here from the release's facts."""

from __future__ import annotations

import base64
import unicodedata
from pathlib import Path

import pytest

from hunyuan_mlx.tokenizer import HunYuanStreamingDetokenizer, HunYuanTokenizer

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "hunyuan-a13b"

# Chinese, English, code, digits, emoji (one with a skin-tone modifier), whitespace runs, CRLF,
# contractions and special tokens written in the text.
VARIED_TEXT = (
    "<|startoftext|>你好，世界！Hunyuan-A13B 是一个混合专家模型。<|extra_4|>"
    "I'm sure they'll say it's 12345 or 3.14159...\n\n  \t"
    "def f(x: int) -> int:\n    return x ** 2  # 平方\r\n"
    "Emoji: 😀👍🏽🇨🇳 and café, naïve, Ωmega; 日本語のテキスト 한국어\n\n\n"
    '{"key": [1, 2, 3]}   \t  end<|extra_0|>助手：好的<|eos|>'
)

SPECIAL_NAMES = ["<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>"] + [
    f"<|extra_{i}|>" for i in range(205)
]


def _require_reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"release reference files not found at {REFERENCE} (see shared/hunyuan-a13b)")
    return REFERENCE


@pytest.fixture(scope="module")
def tok() -> HunYuanTokenizer:
    return HunYuanTokenizer.from_pretrained(_require_reference())


@pytest.fixture(scope="module")
def reference_encoding():
    """tiktoken.Encoding built straight from the README's facts, independent of our module."""
    import tiktoken

    ranks: dict[bytes, int] = {}
    for line in (_require_reference() / "hy.tiktoken").read_bytes().splitlines():
        token = base64.b64decode(line.split()[0])
        if token not in ranks:
            ranks[token] = len(ranks)
    assert len(ranks) == 127957
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    special = {name: 127957 + i for i, name in enumerate(SPECIAL_NAMES)}
    return tiktoken.Encoding(
        "hy-reference", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
    )


@pytest.fixture(scope="module")
def json_tok(tmp_path_factory) -> HunYuanTokenizer:
    """The same vocabulary through our tokenizer.json converter and the `tokenizers` library."""
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (optional backend)")
    from hunyuan_mlx.tokenizer import write_tokenizer_json

    out = write_tokenizer_json(
        _require_reference() / "hy.tiktoken", tmp_path_factory.mktemp("tj") / "tokenizer.json"
    )
    return HunYuanTokenizer.from_tokenizer_json(out)


def test_ids_match_tiktoken_reference(tok, reference_encoding):
    expected = reference_encoding.encode(VARIED_TEXT, allowed_special="all")
    assert tok.encode(VARIED_TEXT) == expected
    assert tok.encode(VARIED_TEXT, add_special_tokens=True) == expected  # the release adds no BOS
    assert expected[0] == 127958 and expected[-1] == 127960


def test_special_token_ids_and_sizes(tok):
    assert tok.vocab_size == len(tok) == 128167
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|eos|>", "<|pad|>"]) == [
        127958,
        127960,
        127961,
    ]
    assert tok.convert_tokens_to_ids("<|extra_0|>") == 127962
    assert tok.special_tokens["<|extra_5|>"] == 127967
    assert tok.special_tokens["<|extra_204|>"] == 128166
    assert tok.eos_token == "<|eos|>" and tok.eos_token_id == 127960
    assert tok.bos_token is None
    assert tok.pad_token_id == 127961
    assert tok.eos_token_ids == [127960, 127967]


def test_text_is_nfc_normalised_like_the_release(tok):
    decomposed = unicodedata.normalize("NFD", "café naïve")
    assert decomposed != "café naïve"
    assert tok.encode(decomposed) == tok.encode("café naïve")


def test_decode_round_trip_and_skip_special(tok):
    ids = tok.encode(VARIED_TEXT)
    assert tok.decode(ids) == VARIED_TEXT
    plain = tok.decode(ids, skip_special_tokens=True)
    assert "<|" not in plain and plain.startswith("你好") and plain.endswith("助手：好的")


def test_decode_invalid_utf8_gives_replacement(tok):
    emoji_ids = tok.encode("😀")
    byte_ids = [tok.convert_tokens_to_ids(b"\xff"), tok.convert_tokens_to_ids(b"\xf0")]
    assert tok.decode(byte_ids) == "\ufffd\ufffd"
    assert tok.decode(tok.encode("a") + byte_ids[1:] + emoji_ids) == "a\ufffd😀"


def test_tokenizer_json_gives_tiktoken_ids(tok, json_tok):
    for text in (VARIED_TEXT, "\n\n  \t", "   ", "x" * 300, "0123456789" * 5):
        assert json_tok.encode(text) == tok.encode(text), repr(text)
    assert json_tok.special_tokens == tok.special_tokens
    assert json_tok.decode(tok.encode(VARIED_TEXT)) == VARIED_TEXT


def test_from_pretrained_without_vocabulary_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hy\.tiktoken.*tokenizer\.json") as err:
        HunYuanTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_chat_template_conversation(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|startoftext|>You are helpful.<|extra_4|>你好<|extra_0|>"
        "Hello!<|eos|><|startoftext|>2+2?<|extra_0|>"
    )
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(text)
    assert ids[0] == 127958 and ids[-1] == 127962
    assert ids.count(127960) == 1 and 127966 in ids


def test_chat_template_without_thinking(tok):
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<|startoftext|>Hi<|extra_0|>"
    no_think = tok.apply_chat_template(messages, enable_thinking=False, tokenize=False)
    assert no_think == "<|startoftext|>Hi<|extra_0|><think>\n\n</think>\n"
    assert tok.apply_chat_template(messages, enable_thinking=True, tokenize=False) == (
        "<|startoftext|>Hi<|extra_0|>"
    )


def test_chat_template_with_tools(tok):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "查询天气",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "北京天气？"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
        },
        {"role": "tool", "content": "晴"},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("<|startoftext|>你是一位函数组合专家。")
    # transformers' tojson: no ASCII escaping, no HTML escaping.
    assert '"name": "get_weather", "description": "查询天气"' in text
    assert "当前时间：" in text and "<|extra_4|>用户：北京天气？<|extra_0|>" in text
    assert text.endswith(
        '<tool_calls>[{"name": "get_weather", "arguments": {"city": "北京"}}]</tool_calls>'
        "<|eos|><tool_response>晴</tool_response><|extra_0|>"
    )


def test_streaming_detokenizer_never_splits_characters(tok):
    text = "流式输出：😀👍🏽 emoji 🇨🇳, 中文 and ascii\n"
    ids = tok.encode(text)
    # Sanity check that the text really puts one character's bytes in several tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.detokenizer
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    assert "".join(segments) == tok.decode(ids) == text
    assert not any("\ufffd" in s for s in segments)
    assert detok.tokens == ids


def test_streaming_detokenizer_flushes_a_truncated_character(tok):
    ids = tok.encode("ok😀")[:-1]
    detok = tok.detokenizer
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == tok.decode(ids)


def test_mlx_lm_wrapper(tok):
    pytest.importorskip("mlx_lm.tokenizer_utils", reason="mlx-lm is not installed")
    wrapper = tok.for_mlx_lm()
    assert wrapper.eos_token_ids == {127960, 127967}
    detok = wrapper.detokenizer
    assert isinstance(detok, HunYuanStreamingDetokenizer)
    for i in tok.encode("你好😀"):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "你好😀"
    assert wrapper.encode("<|eos|>", add_special_tokens=False) == [127960]
    messages = [{"role": "user", "content": "Hi"}]
    assert wrapper.apply_chat_template(messages, enable_thinking=True) == tok.apply_chat_template(
        messages
    )
