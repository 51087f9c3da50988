"""The experts' thresholds measured on this machine (`python -m hunyuan_mlx.tune`), cached as
JSON under `$XDG_CACHE_HOME/hunyuan_mlx/` (default `~/.cache/hunyuan_mlx/`).

One entry per device and MLX version, mapping `key(dtype, bits, group_size, kernel)` to the routed
rows from which that kernel (the padded one, or every expert on every token) was measured faster
than the gathered one (null: never), and `DECODE_GRAPH` to 1 where decode was measured faster as
the whole model's graph than a layer at a time (null: it was not). A cache that cannot be read or
written never stops a run: it is reported once on stderr and the built-in thresholds apply.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

CACHE_FILE = "fast_paths.json"
_warned: set[str] = set()


def cache_path() -> Path:
    """The cache file, under XDG_CACHE_HOME where set."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "hunyuan_mlx" / CACHE_FILE


def device_key() -> str:
    """This device and MLX version: what a measurement holds for."""
    device = mx.default_device()
    try:
        name = mx.device_info().get("device_name", "")
    except (AttributeError, RuntimeError):
        name = ""
    kind = "cpu" if device == mx.cpu else "metal" if mx.metal.is_available() else "cuda"
    return f"{kind} {name} | mlx {mx.__version__}".replace("  ", " ")


# The kernels a threshold is measured for against the gathered one; the padded kernel's keys
# carry no prefix (the cache's first format).
KERNELS = ("padded", "every expert")
DECODE_GRAPH = "decode graph"  # the decode probe's key (`probe.decode_probe`)


def key(dtype: mx.Dtype, bits: int | None, group_size: int | None, kernel: str = "padded") -> str:
    """A threshold's key: the kernel (none for the padded one), the rows' dtype and the experts'
    quantization ("bfloat16 4-bit g64", "every expert: bfloat16 4-bit g64")."""
    dtype_name = str(dtype).removeprefix("mlx.core.")
    quant = "unquantized" if bits is None else f"{bits}-bit g{group_size}"
    return f"{'' if kernel == 'padded' else f'{kernel}: '}{dtype_name} {quant}"


def kernel_of(key_: str) -> str:
    """The kernel a `key` is measured for."""
    return next((k for k in KERNELS[1:] if key_.startswith(f"{k}: ")), KERNELS[0])


def warn(message: str) -> None:
    """Print a cache problem on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"hunyuan_mlx: {message}; using the built-in thresholds", file=sys.stderr)


def read_all() -> dict[str, dict[str, int | None]]:
    """Every device's entry in the cache file; empty (and a warning) when it is missing,
    unreadable or malformed."""
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(f"cannot read the fast-path cache {path} ({e})")
        return {}
    valid = isinstance(data, dict) and all(
        isinstance(entry, dict)
        and all(rows is None or (type(rows) is int and rows > 0) for rows in entry.values())
        for entry in data.values()
    )
    if not valid:
        warn(f"the fast-path cache {path} is malformed")
        return {}
    return data


def cached() -> dict[str, int | None]:
    """This device's measured thresholds (empty where none were measured)."""
    return read_all().get(device_key(), {})


def store(measured: dict[str, int | None]) -> Path | None:
    """Add this device's `measured` thresholds to the cache, atomically (an interrupt leaves the
    old file); the file written, or None (and a warning) where it cannot be."""
    path = cache_path()
    data = read_all()
    data[device_key()] = {**data.get(device_key(), {}), **measured}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        warn(f"cannot write the fast-path cache {path} ({e})")
        return None
    return path
