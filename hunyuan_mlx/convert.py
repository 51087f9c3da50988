"""`python -m hunyuan_mlx.convert`: the converter's command line (see `hunyuan_mlx.converter`).

The implementation lives in `converter` so that the package can export the `convert` function
without importing this entry module first, which `python -m` would report as a double import.
"""

import sys

from .converter import main

if __name__ == "__main__":
    sys.exit(main())
