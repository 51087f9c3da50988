"""Score car-series extraction: `python examples/lora/evaluate_car.py --model M --adapter-path A`.

Reads `{"input", "label"}` lines (the release's `car/test.json`), answers each input greedily with
the chat template and the training data's system prompt, takes the text inside
`<answer>...</answer>` and compares the `；`-separated names with the label's ("无" is none):
exact-match accuracy over the name sets, and micro precision, recall and F1 over the names.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hunyuan_mlx import load
from hunyuan_mlx.cli import run_main
from hunyuan_mlx.cli.options import add_debug_argument
from hunyuan_mlx.files import read_jsonl

NAME_SEPARATOR = "；"
NO_NAME = "无"
# The system prompt of car/train.jsonl.
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_TOKENS = 64
ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def extract_answer(text: str) -> str:
    """The text inside `<answer>...</answer>` (or after an unclosed `<answer>`), else the text
    after `</think>`."""
    match = ANSWER.search(text)
    if match:
        return match.group(1).strip()
    return text.split("</think>")[-1].strip()


def names(answer: str) -> set[str]:
    """The set of names in an answer; "无" (none) and blanks are no names."""
    return {n.strip() for n in answer.split(NAME_SEPARATOR)} - {"", NO_NAME}


def score(predictions: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """Exact match of the name sets, and micro precision / recall / F1 over names."""
    exact = total = true_pos = predicted = expected = 0
    for prediction, label in zip(predictions, labels):
        got, want = names(prediction), names(label)
        exact += got == want
        total += 1
        true_pos += len(got & want)
        predicted += len(got)
        expected += len(want)
    precision = true_pos / predicted if predicted else 0.0
    recall = true_pos / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "examples": total,
        "exact_match": exact / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def read_test_set(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """The `{"input", "label"}` records of a test file; a bad line is an error naming it."""
    records = []
    for number, record in read_jsonl(path)[:limit]:
        if not {"input", "label"} <= record.keys():
            raise ValueError(f"{path}, line {number}: expected an object with input and label")
        records.append(record)
    return records


def evaluate(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, str]],
    system: str = DEFAULT_SYSTEM,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> tuple[list[str], dict[str, float]]:
    """Greedy answers (the extracted answer text) for each record, and their scores."""
    from mlx_lm.generate import generate

    wrapper = tokenizer.for_mlx_lm()
    predictions = []
    # A bar on a terminal (stderr): the real model takes minutes for the 500 titles.
    for record in tqdm(records, desc="Scoring", unit="title", disable=None):
        messages = [{"role": "user", "content": record["input"]}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        prompt = tokenizer.apply_chat_template(messages)
        text = generate(model, wrapper, prompt, max_tokens=max_tokens)
        predictions.append(extract_answer(text))
    return predictions, score(predictions, [r["label"] for r in records])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="examples/lora/evaluate_car.py",
        description="Exact match and micro F1 of car-series names.",
    )
    parser.add_argument("--model", required=True, help="Local model directory or Hub repo id.")
    parser.add_argument("--adapter-path", help="Adapters of a hunyuan_mlx.lora run.")
    parser.add_argument("--data", required=True, help="A test.json of {input, label} lines.")
    parser.add_argument("--limit", type=int, help="Score only the first N examples.")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="System prompt ('' for none).")
    parser.add_argument("--output", help="Write one JSON line per example here.")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Answer and score every test record; print the scores as one JSON line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        records = read_test_set(args.data, args.limit)
        model, tokenizer = load(args.model, adapter_path=args.adapter_path)
        predictions, scores = evaluate(model, tokenizer, records, args.system, args.max_tokens)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                for record, prediction in zip(records, predictions):
                    row = {**record, "prediction": prediction}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps(scores))
    return scores


if __name__ == "__main__":
    main()
