"""hunyuan-mlx: Tencent's HunYuan MoE V1 (Hunyuan-A13B) on MLX.

`models/` is the model, `tokenizer/` the release's tokenizer, `converter` the checkpoint
converter, `generation/` the generation loop and chat, `serve/` the HTTP server, `tuner/`
fine-tuning; `cli/` holds the commands (`hunyuan-mlx <command>`).
"""

from . import models
from .converter import convert
from .loading import load, load_model
from .models import *  # noqa: F403  (the model classes and FastPaths: models.__all__)

__version__ = "0.1.0"

__all__ = [*models.__all__, "convert", "load", "load_model"]
