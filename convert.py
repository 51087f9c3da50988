"""Convert a HunYuan checkpoint to MLX: `python convert.py --hf-path SRC --mlx-path DST [-q]`."""

from hunyuan_mlx.cli.convert import main

if __name__ == "__main__":
    main()
