"""Convert a HunYuan checkpoint to MLX: `python convert.py --hf-path SRC --mlx-path DST [-q]`."""

import sys

from hunyuan_mlx.converter import main

if __name__ == "__main__":
    sys.exit(main())
