"""MLX's CPU matmuls against NumPy's on the same shapes, and the BLAS library each process maps.

Why batching cannot pay on a Linux CPU: a batch of B sequences turns each decode matmul's one row
into B, which a tuned BLAS does in about the time of one (the weights are read once); this prints
how MLX's CPU build does it. One JSON line per shape and kernel (median of `--reps`), then one
naming the shared libraries with "blas" in their name that this process has mapped.

    python -m benchmarks.cpu_blas
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks import a13b as bg


def blas_libraries() -> list[str]:
    """The BLAS shared libraries this process has mapped (Linux: /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
    return sorted(p for p in paths if "blas" in Path(p).name.lower())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows", type=bg.int_list, default=[1, 2, 4, 8, 16, 64],
        help="rows of the input (a batch's tokens)",
    )
    ap.add_argument("--shape", type=bg.int_list, default=[4096, 256], help="in,out features")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if len(args.shape) != 2:
        ap.error(f"--shape: two sizes (in,out), got {len(args.shape)}")
    d_in, d_out = args.shape
    device = bg.device_name()
    weight = mx.random.normal((d_out, d_in))
    quantized = mx.quantize(weight, 64, 4)
    weight_np = np.array(weight)
    for rows in args.rows:
        x = mx.random.normal((rows, d_in))
        x_np = np.array(x)
        kernels = {  # each evaluated by `median_ms` (NumPy's result as it is)
            "mlx float32 matmul": lambda x=x: x @ weight.T,
            "mlx 4-bit quantized_matmul": lambda x=x: mx.quantized_matmul(
                x, *quantized, transpose=True, group_size=64, bits=4
            ),
            "numpy float32 matmul": lambda x_np=x_np: x_np @ weight_np.T,
        }
        for name, fn in kernels.items():
            mx.eval(fn())  # warm
            ms = bg.median_ms(fn, args.reps)
            gflops = 2 * rows * d_in * d_out / ms / 1e6
            print(json.dumps({"kind": "matmul", "device": device, "kernel": name, "rows": rows,
                              "in": d_in, "out": d_out, "ms": ms, "gflops": gflops}))
    print(json.dumps({"kind": "blas", "libraries": blas_libraries(), "mlx": mx.__version__,
                      "numpy": np.__version__}))


if __name__ == "__main__":
    main()
