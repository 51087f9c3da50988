"""Checkpoint files: reading them with errors that name the file (JSON, JSONL, safetensors headers
and shards, the one check of tensors against a model), and writing an output folder whole or not
at all (`staged_output`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx

from .interrupts import signals_as_interrupts

# The one JSON reader lives with the model config, since models/ imports nothing above it.
from .models.config import read_json

INDEX_FILE = "model.safetensors.index.json"
NAMES_SHOWN = 5  # how many missing / unexpected tensor names an error lists
PARTIAL_SUFFIX = ".tmp"  # of the hidden folder an output is written into before its rename
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: str | int) -> int:
    """Bytes in a size such as "5GB", "500MB", "40KiB" or a plain number."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else None
        if unit not in SIZE_UNITS:
            raise ValueError(f"Cannot read size {size!r}: use a number with B, KB, MB, GB or GiB")
        value = int(float(match.group(1)) * SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"Size must be positive, got {size!r}")
    return value


def format_size(size: int) -> str:
    """A byte count in the largest decimal unit that keeps it at least 1."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is an error naming it."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object")
            records.append((number, record))
    return records


def weight_files(model_path: Path, keep: Callable[[str], bool] | None = None) -> list[Path]:
    """The safetensors files of a checkpoint: those its index lists (only those holding a tensor
    `keep` accepts, when given and there is an index), or all in the directory."""
    index = model_path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: no {e}") from None
        names = {f for t, f in weight_map.items() if keep is None or keep(t)}
        files = [model_path / name for name in sorted(names)]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file.name} is listed in {index} but does not exist")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {model_path}")
    return files


def check_safetensors(file: Path) -> dict[str, Any]:
    """Read a safetensors header and check the file holds every byte it declares.

    A truncated download otherwise only fails, obscurely, when the tensor is first used.
    Not `safetensors.safe_open`: its one exception type reports a short file only in its message
    ("incomplete metadata, file not fully covered"; "MetadataIncompleteBuffer" before 0.5), so it
    can neither tell truncation from corruption nor say how many bytes are missing. Reading the
    header is all that is needed here; `mx.load` reads the tensors.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise ValueError(f"{file} is truncated or corrupt: its header runs past the end")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is corrupt: unreadable safetensors header ({e})") from e
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ValueError(
            f"{file} is truncated: it declares {8 + header_len + end} bytes but has {size}"
        )
    return header


def stored_tensors(file: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """(safetensors dtype, shape, offset of its first byte in the file) of each tensor, from the
    checked header: where to read a byte range of a tensor without loading it."""
    header = check_safetensors(file)
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return {
        name: (t["dtype"], tuple(t["shape"]), 8 + header_len + t["data_offsets"][0])
        for name, t in header.items()
        if name != "__metadata__"
    }


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Every tensor of the files, read lazily (`mx.load` reads data on first evaluation)."""
    weights: dict[str, mx.array] = {}
    for file in files:
        check_safetensors(file)
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"Could not read {file}: {e}") from e
    return weights


def check_tensors(
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    problem: str,
    where: Callable[[str], str] = str,
) -> None:
    """Every expected tensor present with its shape, and nothing else; otherwise one ValueError,
    `problem` followed by what is missing, unexpected and misshapen (`where(name)` says where a
    tensor came from)."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_names(unexpected)})")
    for name in sorted(expected.keys() & found.keys()):
        if tuple(found[name]) != tuple(expected[name]):
            problems.append(
                f"{where(name)} has shape {tuple(found[name])}, expected {tuple(expected[name])}"
            )
            break
    if problems:
        raise ValueError(f"{problem}: " + "; ".join(problems))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (", ..." if len(names) > NAMES_SHOWN else "")


def check_destination(destination: Path, source: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty folder or a file without `force`, and ever the source."""
    resolved, source_resolved = destination.resolve(), source.resolve()
    if resolved == source_resolved or resolved in source_resolved.parents:
        raise ValueError(f"Output path {destination} would overwrite the source {source}")
    if not destination.exists() or force:
        return
    if not destination.is_dir():
        raise ValueError(f"Output path {destination} is a file, not a folder (use --force)")
    if any(destination.iterdir()):
        raise ValueError(
            f"Output path {destination} already exists and is not empty (use --force)"
        )


def partial_outputs(destination: Path) -> list[Path]:
    """Folders that interrupted runs writing `destination` left beside it (see `staged_output`)."""
    return sorted(destination.parent.glob(f".{destination.name}.*{PARTIAL_SUFFIX}"))


@contextlib.contextmanager
def staged_output(destination: Path, force: bool = False) -> Iterator[Path]:
    """A new folder beside `destination` to write the output into: renamed to `destination` when
    the block ends, removed on any error or interrupt (Ctrl-C, SIGTERM, SIGHUP), so nothing
    half-written is left. Leftovers of earlier runs that could not clean up (SIGKILL, a power
    cut) are reported, and removed with `force`."""
    leftovers = partial_outputs(destination)
    if leftovers:
        names = ", ".join(str(p) for p in leftovers)
        if force:
            for path in leftovers:
                shutil.rmtree(path, ignore_errors=True)
            print(f"Removed the partial output of an earlier run: {names}", file=sys.stderr)
        else:
            print(
                f"Note: an earlier run writing {destination} left a partial output: {names} "
                "(remove it, or pass --force to have it removed)",
                file=sys.stderr,
            )
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{destination.name}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL_SUFFIX, dir=destination.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the output from other users
    try:
        with signals_as_interrupts():
            yield tmp
            _replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, destination: Path) -> None:
    """Move the finished output into place; an existing destination is removed only after."""
    old = None
    if destination.exists() or destination.is_symlink():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        destination.rename(old)
    tmp.rename(destination)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
