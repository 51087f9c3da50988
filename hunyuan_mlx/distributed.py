"""Running one model over the ranks of `mlx.launch`: the group, which part of the model each rank
holds (`Plan`: tensor or pipeline mode, checked against the config before any weight is read),
steps every rank passes or fails together (`together`), and a seed every rank shares.

The model side of the split is `models/sharding.py`; `loading.load_model(group=...)` runs it.
"""

from __future__ import annotations

import json
import re
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from .interrupts import debug_from_env
from .models import HunYuanMoEV1Config
from .models.quantization import module_params
from .models.sharding import pipeline_stage

T = TypeVar("T")
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MESSAGE_BYTES = 512  # of each rank's error message, as every rank gathers them


def init_group() -> mx.distributed.Group:
    """The group of the ranks `mlx.launch` started (ring, JACCL, MPI or NCCL); size 1 otherwise."""
    return mx.distributed.init()


@dataclass(frozen=True)
class Plan:
    """What one rank holds: `mode` "tensor" (a share of every layer) or "pipeline" (layers
    [first_layer, end_layer))."""

    mode: str
    rank: int
    size: int
    first_layer: int
    end_layer: int

    def keeps(self, name: str) -> bool:
        """Whether this rank needs the tensor `name` (checkpoint or model naming)."""
        found = LAYER_NAME.search(name)
        return found is None or self.first_layer <= int(found[1]) < self.end_layer


def make_plan(config: HunYuanMoEV1Config, group: mx.distributed.Group, pipeline: bool) -> Plan:
    """This rank's part; a ValueError naming what the rank count does not divide, from the config
    alone, so it comes before any weight is read."""
    size, rank = group.size(), group.rank()
    if pipeline:
        first, end = pipeline_stage(config, size, rank)
        return Plan("pipeline", rank, size, first, end)
    problem = tensor_problem(config, size)
    if problem:
        fits = [str(n) for n in range(2, size) if not tensor_problem(config, n)]
        # "2, 3 or 4 ranks"; where no smaller count of several ranks splits it, only --pipeline.
        counts = " or ".join(filter(None, [", ".join(fits[:-1]), *fits[-1:]]))
        raise ValueError(
            f"Tensor mode cannot split this model over {size} ranks: {problem}. Use --pipeline "
            "(layers split over the ranks)" + (f", or {counts} ranks" if counts else "")
        )
    return Plan("tensor", rank, size, 0, config.num_hidden_layers)


def tensor_problem(config: HunYuanMoEV1Config, size: int) -> str | None:
    """What `size` ranks cannot split evenly in tensor mode, or None: heads, key-value heads,
    expert and shared-expert widths, and the inputs of quantized projections split by column
    (a rank's slice must hold whole quantization groups)."""
    counts = [
        ("query heads", config.num_attention_heads),
        ("key-value heads", config.num_key_value_heads),
    ]
    # Projections whose input is split: (module path, input width).
    split_inputs = []
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        moe = config.layer_moe_intermediate_size(i)
        counts.append((f"layer {i}'s expert width", moe))
        split_inputs += [
            (f"{prefix}.self_attn.o_proj", config.num_attention_heads * config.head_dim),
            (f"{prefix}.mlp.experts.down_proj", moe),
        ]
        shared = config.intermediate_size * config.layer_num_shared_expert(i)
        if config.use_mixed_mlp_moe and shared:
            counts.append((f"layer {i}'s shared-expert width", shared))
            split_inputs.append((f"{prefix}.mlp.shared_mlp.down_proj", shared))
    for what, count in counts:
        if count % size:
            return f"its {count} {what} are not a multiple of {size}"
    if config.quantization is not None:
        for path, width in split_inputs:
            params = module_params(path, config.quantization)
            group_size = (params or {}).get("group_size")
            if group_size and (width // size) % group_size:
                return (
                    f"{path} would keep {width // size} inputs per rank, not whole groups of "
                    f"{group_size} quantized weights"
                )
    return None


def together(group: mx.distributed.Group | None, step: Callable[[], T]) -> T:
    """`step()` on every rank, failing on all if it fails on any, so no rank is left waiting in a
    collective for one that has stopped. Call it before the collectives that depend on the step.

    Rank 0 raises one RuntimeError naming each failed rank, its host and its error; the other
    ranks exit with status 1 and print nothing. Without a group the step just runs.
    """
    if group is None or group.size() == 1:
        return step()
    result, message = None, ""
    try:
        result = step()
    except Exception as e:  # anything: a rank that stops without telling the others hangs them
        if debug_from_env():
            traceback.print_exc()
        message = error_line(e)
    host = socket.gethostname()
    failures = gather_messages(group, f"{host}\n{message}" if message else "")
    if not failures and not message:
        return result
    if group.rank() != 0:
        raise SystemExit(1)
    # A rank whose step failed never goes on with no result, even if the gather lost its message.
    failures = failures or [(0, host, message)]
    causes = {cause for _, _, cause in failures}
    if len(failures) == group.size() and len(causes) == 1:  # e.g. the rank count: say it once
        raise RuntimeError(causes.pop())
    raise RuntimeError(
        "; ".join(f"rank {rank} ({host}): {cause}" for rank, host, cause in failures)
    )


def error_line(e: Exception) -> str:
    """`e` as one line that is never empty: OSError and ValueError by their text (they name the
    file or flag), anything else, or an exception without text, also by its type."""
    text = str(e)
    if text and isinstance(e, (OSError, ValueError)):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def gather_messages(group: mx.distributed.Group, message: str) -> list[tuple[int, str, str]]:
    """(rank, host, message) of every rank whose `message` ("host\nmessage") is not empty.

    Gathered with `all_sum` (each rank fills its own row), which every backend has."""
    data = np.frombuffer(message.encode()[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0"), np.uint8)
    rows = np.zeros((group.size(), MESSAGE_BYTES), np.int32)
    rows[group.rank()] = data
    summed = np.array(mx.distributed.all_sum(mx.array(rows), group=group)).astype(np.uint8)
    failures = []
    for rank, row in enumerate(summed):
        text = row.tobytes().rstrip(b"\0").decode(errors="replace")
        if text:
            host, _, cause = text.partition("\n")
            failures.append((rank, host, cause))
    return failures


def broadcast_json(group: mx.distributed.Group, value: Any) -> Any:
    """Rank 0's `value` (anything JSON holds) on every rank; the others' `value` is not read.
    Two `all_sum`s, which every backend has: the length, then the bytes (rank 0's row)."""
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    size = mx.distributed.all_sum(mx.array(len(data), dtype=mx.int32), group=group).item()
    row = np.zeros(size, np.int32)
    row[: len(data)] = np.frombuffer(data, np.uint8)
    summed = np.array(mx.distributed.all_sum(mx.array(row), group=group)).astype(np.uint8)
    return json.loads(summed.tobytes())


def shared_seed(group: mx.distributed.Group | None, seed: int | None) -> int | None:
    """`seed`, or over several ranks rank 0's random pick: the same on every rank, which all
    sample the same tokens from the same logits (rank 0's tokens are the ones printed)."""
    if group is None or group.size() == 1:
        return seed
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31)) if group.rank() == 0 else 0
        seed = int(mx.distributed.all_sum(mx.array(seed, dtype=mx.int32), group=group).item())
    return seed
