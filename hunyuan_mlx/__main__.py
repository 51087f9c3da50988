"""`python -m hunyuan_mlx <command>`: see `hunyuan_mlx.cli`."""

from .cli import main

main()
