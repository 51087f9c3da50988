"""`python -m hunyuan_mlx.generate`: the `generate` command, `hunyuan_mlx.cli.generate`."""

from .cli.generate import main

if __name__ == "__main__":
    main()
