"""`python -m hunyuan_mlx.chat`: the `chat` command, `hunyuan_mlx.cli.chat`."""

from .cli.chat import main

if __name__ == "__main__":
    main()
