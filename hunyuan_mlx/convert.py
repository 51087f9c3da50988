"""`python -m hunyuan_mlx.convert`: the `convert` command, `hunyuan_mlx.cli.convert`."""

from .cli.convert import main

if __name__ == "__main__":
    main()
