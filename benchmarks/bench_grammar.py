"""The cost of structured outputs per engine over the release's 128,167-token vocabulary: building
the engine's view of the tokenizer (once), compiling a JSON schema (per request), computing the
next-token mask (per token) and applying it to MLX logits (per token), while a fixed valid JSON
answer is fed token by token. llguidance runs as the server does (`serve.grammar`); xgrammar and
outlines-core, where installed, through their own APIs (`pip install xgrammar outlines-core`).

    python -m benchmarks.bench_grammar --tokenizer-dir ../shared/hunyuan-a13b

One JSON line per engine (milliseconds; medians over the answer's tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from hunyuan_mlx.serve.grammar import BITS, Grammars, answer_grammar, json_body
from hunyuan_mlx.tokenizer import HunYuanTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ANSWER = {"name": "Alice Smith", "age": 42, "tags": ["x", "yy", "zzz", "hello world"]}


def ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def apply_bitmask(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """An int32 bitmask (one bit a token) applied to MLX logits, as `GrammarProcessor` does."""
    words = mx.array(bitmask)
    allowed = ((words[..., None] >> mx.arange(BITS, dtype=mx.int32)) & 1).reshape(1, -1)
    return mx.where(allowed[:, : logits.shape[-1]].astype(mx.bool_), logits, -mx.inf)


def per_token(
    ids: list[int], mask: Callable[[], object], apply: Callable[[object], mx.array],
    advance: Callable[[int], None],
) -> tuple[float, float]:  # fmt: skip
    """Median (mask, mask + apply) milliseconds over `ids`."""
    masks, totals = [], []
    for token in ids:
        start = time.perf_counter()
        m = mask()
        masks.append(ms(start))
        mx.eval(apply(m))
        totals.append(ms(start))
        advance(token)
    return statistics.median(masks), statistics.median(totals)


def bench_llguidance(tokenizer: HunYuanTokenizer, ids: list[int], logits: mx.array) -> dict:
    grammars = Grammars(tokenizer)
    start = time.perf_counter()
    grammars.lltokenizer  # noqa: B018 - built on first use; timed here
    build = ms(start)
    start = time.perf_counter()
    processor = grammars.processor(answer_grammar(json_body(SCHEMA), thinking=False))
    compile_ms = ms(start)
    # The answer's opening tag first, as the grammar asks for it.
    processor.matcher.consume_tokens(tokenizer.encode("<answer>\n"))
    import llguidance.numpy

    def mask():
        llguidance.numpy.fill_next_token_bitmask(processor.matcher, processor._bitmask)
        return processor._bitmask

    mask_ms, total_ms = per_token(
        ids, mask, lambda m: apply_bitmask(logits, m), processor.matcher.consume_token
    )
    return dict(engine="llguidance", tokenizer_ms=build, compile_ms=compile_ms,
                mask_ms=mask_ms, mask_apply_ms=total_ms)  # fmt: skip


def bench_xgrammar(tokenizer: HunYuanTokenizer, ids: list[int], logits: mx.array) -> dict:
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo(
        list(tokenizer.token_bytes), vocab_type=xgrammar.VocabType.RAW,
        vocab_size=tokenizer.vocab_size, stop_token_ids=tokenizer.eos_token_ids,
    )  # fmt: skip
    compiler = xgrammar.GrammarCompiler(info)
    build = ms(start)
    start = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compile_ms = ms(start)
    bitmask = xgrammar.allocate_token_bitmask(1, tokenizer.vocab_size)

    def mask():
        matcher.fill_next_token_bitmask(bitmask)
        return bitmask.numpy()

    mask_ms, total_ms = per_token(
        ids, mask, lambda m: apply_bitmask(logits, m), matcher.accept_token
    )
    return dict(engine="xgrammar", tokenizer_ms=build, compile_ms=compile_ms,
                mask_ms=mask_ms, mask_apply_ms=total_ms)  # fmt: skip


def bench_outlines_core(tokenizer: HunYuanTokenizer, ids: list[int], logits: mx.array) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    specials = set(tokenizer.special_tokens.values())
    tokens: dict[bytes, list[int]] = {}
    for i, raw in enumerate(tokenizer.token_bytes):
        if i not in specials:
            tokens.setdefault(raw, []).append(i)
    vocabulary = Vocabulary(tokenizer.eos_token_ids[0], tokens)
    build = ms(start)
    start = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))
    compile_ms = ms(start)
    none = mx.zeros((1, logits.shape[-1]), dtype=mx.bool_)

    def apply(allowed):
        keep = mx.put_along_axis(none, mx.array(allowed)[None], mx.array(True), axis=1)
        return mx.where(keep, logits, -mx.inf)

    mask_ms, total_ms = per_token(ids, guide.get_tokens, apply, guide.advance)
    return dict(engine="outlines-core", tokenizer_ms=build, compile_ms=compile_ms,
                mask_ms=mask_ms, mask_apply_ms=total_ms)  # fmt: skip


ENGINES = {
    "llguidance": ("llguidance", bench_llguidance),
    "xgrammar": ("xgrammar", bench_xgrammar),
    "outlines-core": ("outlines_core", bench_outlines_core),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-dir", required=True, help="the release's tokenizer files")
    args = parser.parse_args()
    tokenizer = HunYuanTokenizer.from_pretrained(args.tokenizer_dir)
    ids = tokenizer.encode(json.dumps(ANSWER))
    logits = mx.random.normal((1, tokenizer.vocab_size))
    mx.eval(logits)
    for name, (module, bench) in ENGINES.items():
        if importlib.util.find_spec(module) is None:
            print(json.dumps({"engine": name, "skipped": f"{module} is not installed"}))
            continue
        result = bench(tokenizer, ids, logits)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in result.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
