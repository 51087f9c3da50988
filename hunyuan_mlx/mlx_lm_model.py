"""This project's model for mlx-lm's own tools, through mlx-lm's custom-model mechanism.

A converted checkpoint carries `MODEL_FILE`, named by `model_file` in its config.json, which
imports `Model` and `ModelArgs` from the installed hunyuan-mlx package (no model code is copied).
mlx-lm runs that file only when told to trust it (`mlx_lm.load(path, trust_remote_code=True)`,
`--trust-remote-code` on its CLIs), and then builds, quantizes and fills this project's
`HunYuanMoEV1ForCausalLM`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import read_json

MODEL_FILE = "hunyuan_mlx_model.py"
MODEL_FILE_SOURCE = '''"""mlx-lm custom model file: the HunYuan model of the installed hunyuan-mlx.

mlx-lm runs it only with trust_remote_code; it needs `pip install hunyuan-mlx`.
"""

from hunyuan_mlx import HunYuanMoEV1Config as ModelArgs  # noqa: F401
from hunyuan_mlx import HunYuanMoEV1ForCausalLM as Model  # noqa: F401
'''


def add_model_file(directory: str | Path) -> None:
    """Write `MODEL_FILE` into a checkpoint and name it in its config.json's `model_file`."""
    directory = Path(directory)
    (directory / MODEL_FILE).write_text(MODEL_FILE_SOURCE)
    config_file = directory / "config.json"
    config = read_json(config_file)
    config["model_file"] = MODEL_FILE
    config_file.write_text(json.dumps(config, indent=2) + "\n")
