"""`python -m hunyuan_mlx.lora`: the `lora` command, `hunyuan_mlx.cli.lora`."""

from .cli.lora import main

if __name__ == "__main__":
    main()
