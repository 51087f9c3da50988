"""`python -m hunyuan_mlx.fuse`: the `fuse` command, `hunyuan_mlx.cli.fuse`."""

from .cli.fuse import main

if __name__ == "__main__":
    main()
