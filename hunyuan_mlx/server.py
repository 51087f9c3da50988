"""`python -m hunyuan_mlx.server`: the `server` command, `hunyuan_mlx.cli.server`."""

from .cli.server import main

if __name__ == "__main__":
    main()
