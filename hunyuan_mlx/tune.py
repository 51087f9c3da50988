"""`python -m hunyuan_mlx.tune`: the `tune` command, `hunyuan_mlx.cli.tune`."""

from .cli.tune import main

if __name__ == "__main__":
    main()
