"""`python -m hunyuan_mlx.evaluate`: the `evaluate` command, `hunyuan_mlx.cli.evaluate`."""

from .cli.evaluate import main

if __name__ == "__main__":
    main()
