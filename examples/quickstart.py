"""Offline end-to-end smoke test: a small random HunYuan checkpoint, loaded, run and decoded.

The weights are RANDOM: the text this prints is noise. What it shows is the pipeline: a
checkpoint with the release's structure (64 experts, top-8, a shared expert, GQA, QK-norm,
NTK-alpha RoPE, tied embeddings) but fewer and narrower layers, written with the release's
tensor names, loaded by `hunyuan_mlx.load`, run forward and decoded greedily with a KV cache.

    python examples/quickstart.py [--layers 4] [--hidden 256] [--tokens 16] [--save demo-model]

With `--save DIR` the checkpoint is kept in DIR, with the release's tokenizer files when
`../shared/hunyuan-a13b/` has them, so that the README's commands (generate, chat, convert, LoRA)
can be tried on it at once; what it says is noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import hunyuan_mlx
from hunyuan_mlx.cli import run_main
from hunyuan_mlx.cli.options import add_debug_argument
from hunyuan_mlx.models.quantization import DEFAULT_Q_MODE, Q_MODE_DEFAULTS

RELEASE = Path(__file__).resolve().parents[1].parent / "shared" / "hunyuan-a13b"
TOKENIZER_FILES = ("hy.tiktoken", "tokenizer_config.json", "generation_config.json")
# Tensor mode over 2 or 4 ranks splits the experts' width and the key-value heads; a rank's slice
# of a quantized down projection must hold whole groups (64 weights by the converter's default).
RANKS = 4
GROUP_SIZE = Q_MODE_DEFAULTS[DEFAULT_Q_MODE][0]
DEFAULT_LAYERS, DEFAULT_HIDDEN = 4, 256


def release_config() -> dict:
    """The real config when `../shared/hunyuan-a13b` is there, else its architecture fields."""
    if (RELEASE / "config.json").is_file():
        return json.loads((RELEASE / "config.json").read_text())
    return dict(
        model_type="hunyuan", vocab_size=128167, num_experts=64, moe_topk=8, num_shared_expert=1,
        num_attention_heads=32, num_key_value_heads=8, use_qk_norm=True, tie_word_embeddings=True,
        rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
    )  # fmt: skip


def demo_config(layers: int, hidden: int) -> dict:
    """The release's config with fewer, narrower layers, which split in tensor mode over 2 and 4
    ranks also when quantized."""
    config = release_config()
    # The release's expert width is 3/4 of its hidden size; rounded up so that every rank of a
    # tensor split gets whole quantization groups (256 at the default hidden 256).
    width = -(-hidden * 3 // 4 // (RANKS * GROUP_SIZE)) * RANKS * GROUP_SIZE
    config.update(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=width,
        moe_intermediate_size=[width] * layers,
        moe_topk=[config["moe_topk"][0] if isinstance(config["moe_topk"], list) else 8] * layers,
        num_shared_expert=[1] * layers,
        num_attention_heads=4 * RANKS,  # the release's 4 query heads per key-value head
        num_key_value_heads=RANKS,
        attention_head_dim=hidden // (4 * RANKS),
    )
    return config


def write_random_checkpoint(path: Path, layers: int, hidden: int) -> None:
    """A release-layout checkpoint (per-expert tensor names) with random bf16 weights."""
    config = demo_config(layers, hidden)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)  # the same random weights, and so the same output, every run
    model = hunyuan_mlx.HunYuanMoEV1ForCausalLM(hunyuan_mlx.HunYuanMoEV1Config.from_dict(config))
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        value = value.astype(mx.float32 if name.endswith("gate.wg.weight") else mx.bfloat16)
        if ".experts.gate_up_proj." in name:  # unstack into the release's per-expert tensors
            for e in range(value.shape[0]):
                gate, up = mx.split(value[e], 2, axis=0)
                tensors[name.replace("gate_up_proj", f"{e}.gate_proj")] = gate
                tensors[name.replace("gate_up_proj", f"{e}.up_proj")] = up
        elif ".experts.down_proj." in name:
            for e in range(value.shape[0]):
                tensors[name.replace("down_proj", f"{e}.down_proj")] = value[e]
        else:
            tensors[name] = value
    mx.save_safetensors(str(path / "model.safetensors"), tensors)
    for name in TOKENIZER_FILES:
        if (RELEASE / name).is_file():
            shutil.copy(RELEASE / name, path / name)


def run(path: Path, layers: int, hidden: int, tokens: int) -> None:
    """Write the random checkpoint at `path`, load it, then time a forward pass and decoding."""
    start = time.perf_counter()
    write_random_checkpoint(path, layers, hidden)
    print(f"Wrote a random checkpoint ({layers} layers, hidden {hidden}) "
          f"in {time.perf_counter() - start:.2f} s")  # fmt: skip

    start = time.perf_counter()
    if (path / "hy.tiktoken").is_file():  # copied from the release when it is there
        model, tokenizer = hunyuan_mlx.load(path)
    else:  # `load` refuses a folder without a tokenizer; the model alone runs on token ids
        model, tokenizer = hunyuan_mlx.load_model(path), None
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"Loaded {n_params / 1e6:.1f}M parameters in {time.perf_counter() - start:.2f} s")

    if tokenizer is not None:
        messages = [{"role": "user", "content": "/no_think Say hello."}]
        prompt = tokenizer.apply_chat_template(messages)
    else:
        print(f"(no tokenizer: {RELEASE} is absent, so the prompt is raw token ids)")
        prompt = list(range(100, 120))

    cache = model.make_cache()
    start = time.perf_counter()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    mx.eval(logits)
    prefill = time.perf_counter() - start
    generated = []
    start = time.perf_counter()
    for _ in range(tokens):
        token = mx.argmax(logits, axis=-1)
        generated.append(token.item())
        logits = model(token[:, None], cache=cache)[:, -1]
    decode = time.perf_counter() - start

    print(f"Prompt: {len(prompt)} tokens, {len(prompt) / prefill:.1f} tokens/s")
    print(f"Decode: {len(generated)} tokens, {len(generated) / decode:.1f} tokens/s")
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    shown = repr(tokenizer.decode(generated)) if tokenizer is not None else generated
    print(f"Greedy tokens (random weights, so noise): {shown}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the smoke test in a temporary folder, or in `--save DIR`, kept for trying commands."""
    parser = argparse.ArgumentParser(
        prog="examples/quickstart.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN)
    parser.add_argument("--tokens", type=int, default=16, help="tokens to decode greedily")
    parser.add_argument(
        "--save", help="Keep the random checkpoint in this new folder (to try the commands on)"
    )
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    with run_main(parser.prog, args.debug):
        if args.save is None:
            with tempfile.TemporaryDirectory() as tmp:
                run(Path(tmp) / "hunyuan-random", args.layers, args.hidden, args.tokens)
            return
        path = Path(args.save)
        if path.exists():
            raise FileExistsError(f"{path} already exists: --save makes a new folder")
        run(path, args.layers, args.hidden, args.tokens)
        note = "" if (path / "hy.tiktoken").is_file() else (
            f" It has no tokenizer ({RELEASE} is absent), so only Python can run it."
        )
        print(f"\nKept the checkpoint in {path}: random weights, so what it says is noise.{note}"
              f"\nTry: python -m hunyuan_mlx.generate --model {path} --prompt hello "
              f"--max-tokens 20")  # fmt: skip


if __name__ == "__main__":
    main()
