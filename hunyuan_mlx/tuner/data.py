"""Fine-tuning data: JSONL files of chat, prompt/completion or text records, tokenized up front.

Records are rendered by mlx-lm's dataset classes, which call the HunYuan tokenizer's own chat
template. Each example becomes `(tokens, offset)`: the loss counts tokens from `offset` on, which
is the answer's first token when the prompt is masked and 0 otherwise; mlx-lm's batching and loss
read exactly that pair.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

from ..files import read_jsonl

DATA_SPLITS = ("train", "valid", "test")
# Format name -> the keys a record of that format has, each with its JSON type.
DATA_FORMATS: dict[str, dict[str, type]] = {
    "chat": {"messages": list},
    "completions": {"prompt": str, "completion": str},
    "text": {"text": str},
}
# Whether the loss skips the prompt when --mask-prompt is not given (text has no prompt).
MASK_PROMPT_DEFAULT = {"chat": True, "completions": True, "text": False}

Example = tuple[list[int], int]


def record_format(record: dict[str, Any]) -> str | None:
    """The format whose keys the record has, or None."""
    for name, keys in DATA_FORMATS.items():
        if all(key in record for key in keys):
            return name
    return None


def check_record(record: dict[str, Any], data_format: str, where: str) -> None:
    """Raise a ValueError naming `where` unless the record is a well-formed `data_format` one."""
    found = record_format(record)
    if found != data_format:
        keys = ", ".join(DATA_FORMATS[data_format])
        raise ValueError(f"{where}: expected a {data_format} record with keys {keys}")
    for key, key_type in DATA_FORMATS[data_format].items():
        if not isinstance(record[key], key_type):
            raise ValueError(f"{where}: {key!r} must be a {key_type.__name__}")
    if data_format == "chat":
        messages = record["messages"]
        if not messages:
            raise ValueError(f"{where}: 'messages' is empty")
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content", ""), str)
            ):
                raise ValueError(
                    f"{where}: message {i} must be an object with a string role and content"
                )


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_seq_length: int,
    mask_prompt: bool | None = None,
) -> list[Example]:
    """Tokenize a JSONL file into `(tokens, offset)` examples, truncated to `max_seq_length`.

    `mask_prompt` None takes the format's default (`MASK_PROMPT_DEFAULT`). Truncation is counted
    in one warning; an example whose prompt alone fills `max_seq_length` has no answer left to
    learn and is dropped, counted in the same warning.
    """
    records = read_jsonl(path)
    if not records:
        return []
    data_format = record_format(records[0][1])
    if data_format is None:
        raise ValueError(
            f"{path}, line {records[0][0]}: unknown record format; expected one of "
            + "; ".join(f"{name} ({', '.join(keys)})" for name, keys in DATA_FORMATS.items())
        )
    for number, record in records:
        check_record(record, data_format, f"{path}, line {number}")
    if mask_prompt is None:
        mask_prompt = MASK_PROMPT_DEFAULT[data_format]
    data = [record for _, record in records]
    if data_format == "chat":
        if mask_prompt:
            for number, record in records:
                if record["messages"][-1]["role"] != "assistant":
                    raise ValueError(
                        f"{path}, line {number}: with the prompt masked the last message "
                        "must be the assistant's answer"
                    )
        dataset = ChatDataset(data, tokenizer, mask_prompt=mask_prompt)
    elif data_format == "completions":
        dataset = CompletionsDataset(data, tokenizer, "prompt", "completion", mask_prompt)
    else:
        if mask_prompt:
            raise ValueError(f"{path}: text records have no prompt to mask")
        dataset = TextDataset(data, tokenizer)

    examples: list[Example] = []
    truncated = dropped = 0
    for record in data:
        tokens, offset = dataset.process(record)
        if len(tokens) > max_seq_length:
            truncated += 1
            tokens = tokens[:max_seq_length]
        if offset >= len(tokens):
            dropped += 1
            continue
        examples.append((tokens, offset))
    if truncated:
        warnings.warn(
            f"{path}: {truncated} of {len(data)} examples are longer than max_seq_length="
            f"{max_seq_length} tokens and were truncated"
            + (f"; {dropped} of them had no answer token left and were dropped" if dropped else ""),
            stacklevel=2,
        )
    return examples


def load_data_dir(
    data_dir: str | Path,
    tokenizer: Any,
    max_seq_length: int,
    mask_prompt: bool | None = None,
) -> dict[str, list[Example]]:
    """`{split: examples}` for each of train/valid/test.jsonl present in `data_dir`."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Data directory {directory} does not exist")
    return {
        split: load_examples(directory / f"{split}.jsonl", tokenizer, max_seq_length, mask_prompt)
        for split in DATA_SPLITS
        if (directory / f"{split}.jsonl").is_file()
    }


def split_batch(batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Inputs, next-token targets and the mask of the scored targets (`offset <= i < length` of
    each row, as `iterate_batches` gives them) of a training batch."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = mx.arange(1, targets.shape[1] + 1)
    mask = (positions >= lengths[:, 0:1]) & (positions < lengths[:, 1:])
    return inputs, targets, mask
