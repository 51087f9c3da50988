"""QLoRA training speed and peak memory: hunyuan-mlx beside mlx-lm's own HunYuan model.

Both models get the same shape (Hunyuan-A13B by default, or scaled down with --layers and
--width-scale), random 4-bit weights made directly as packed bits and scales (no bf16 model is
ever built), rank-r LoRA on the same modules (attention, shared MLP, routed experts) of the last
--lora-layers layers, and the same compiled Adam step on random tokens. Each measurement runs in a
fresh process, so peak memory is its own, and prints one JSON line:

    python -m benchmarks.bench_lora                                   # A13B, on a GPU
    python -m benchmarks.bench_lora --layers 2 --width-scale 0.0625 --vocab 4096 \\
        --seq-lengths 128 256 --steps 3                                # a quick CPU check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

# Hunyuan-A13B's architecture (../shared/hunyuan-a13b/config.json), as both models read it.
A13B: dict[str, Any] = {
    "model_type": "hunyuan",
    "vocab_size": 128167,
    "hidden_size": 4096,
    "intermediate_size": 3072,
    "moe_intermediate_size": 3072,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "attention_bias": False,
    "num_experts": 64,
    "moe_topk": 8,
    "num_shared_expert": 1,
    "use_mixed_mlp_moe": True,
    "use_qk_norm": True,
    "use_cla": False,
    "cla_share_factor": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
    "tie_word_embeddings": True,
}
HEAD_DIM = 128
IMPLS = ("hunyuan_mlx", "mlx_lm")
# The same modules in each implementation's names, by this project's target group.
LORA_GROUPS = ("attention", "shared_mlp", "experts")
MLX_LM_KEYS = {
    "attention": [f"self_attn.{p}_proj" for p in "qkvo"],
    "shared_mlp": [f"mlp.shared_mlp.{p}_proj" for p in ("gate", "up", "down")],
    "experts": [f"mlp.switch_mlp.{p}_proj" for p in ("gate", "up", "down")],
}


def lora_keys(impl: str, groups: list[str]) -> list[str]:
    if impl == "hunyuan_mlx":
        return list(groups)
    return [key for group in groups for key in MLX_LM_KEYS[group]]


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """A13B with `--layers` layers and heads / widths scaled by `--width-scale` (head dim kept)."""
    heads = max(1, round(A13B["num_attention_heads"] * args.width_scale))
    width = max(args.group_size, round(3072 * args.width_scale / args.group_size) * args.group_size)
    return {
        **A13B,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, round(A13B["num_key_value_heads"] * args.width_scale)),
        "hidden_size": heads * HEAD_DIM,
        "intermediate_size": width,
        "moe_intermediate_size": width,
        "num_experts": args.experts,
        "vocab_size": args.vocab,
    }


def randomize_quantized(model: nn.Module, bits: int) -> None:
    """Give every quantized module random packed weights and scales, never computing the float
    weights it was built from (they stay unevaluated and are dropped)."""
    for _, module in model.named_modules():
        if "scales" in module:
            bits32 = mx.random.randint(-(2**31), 2**31 - 1, module.weight.shape, dtype=mx.int32)
            module.weight = bits32.view(mx.uint32)
            scales = mx.random.uniform(0.003, 0.006, module.scales.shape).astype(mx.bfloat16)
            module.scales = scales
            module.biases = -(2 ** (bits - 1)) * scales


def build(
    impl: str, config: dict[str, Any], checkpointing: bool, args: argparse.Namespace
) -> nn.Module:
    """The random 4-bit model of one implementation, with LoRA and optional checkpointing."""
    quant = {"group_size": args.group_size, "bits": args.bits}
    keys = lora_keys(impl, args.targets)
    lora = {"rank": args.rank, "scale": 20.0, "dropout": 0.0, "keys": keys}
    if impl == "hunyuan_mlx":
        from hunyuan_mlx import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
        from hunyuan_mlx.quantize import apply_quantization
        from hunyuan_mlx.tuner.adapters import prepare_model
        from hunyuan_mlx.tuner.trainer import checkpoint_layers

        model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config.from_dict(config))
        apply_quantization(model, quant)
        randomize_quantized(model, args.bits)
        model.set_dtype(mx.bfloat16)
        for layer in model.layers:  # the router stays float32, as a loaded checkpoint has it
            if "gate" in layer.mlp:
                layer.mlp.gate.wg.weight = layer.mlp.gate.wg.weight.astype(mx.float32)
        mx.eval(model.parameters())
        prepare_model(model, "lora", args.lora_layers, lora)
        if checkpointing:
            checkpoint_layers(model)
    else:
        from mlx_lm.models.hunyuan import Model, ModelArgs
        from mlx_lm.tuner.trainer import grad_checkpoint
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model = Model(ModelArgs.from_dict(config))
        nn.quantize(
            model,
            **quant,
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("gate.wg"),
        )
        randomize_quantized(model, args.bits)
        model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
        model.freeze()
        linear_to_lora_layers(model, args.lora_layers, lora)
        if checkpointing:
            grad_checkpoint(model.layers[0])
    mx.eval(model.parameters())
    return model


def measure(
    impl: str, seq_length: int, checkpointing: bool, args: argparse.Namespace
) -> dict[str, Any]:
    """Build, warm up (compile), then time `--steps` training steps of one configuration."""
    from hunyuan_mlx.tuner.trainer import training_step

    mx.random.seed(0)
    config = model_config(args)
    model = build(impl, config, checkpointing, args)
    weights_gb = mx.get_active_memory() / 1e9
    step, state = training_step(model, optim.Adam(learning_rate=1e-5))
    batch = mx.random.randint(0, config["vocab_size"], (args.batch_size, seq_length + 1))
    lengths = mx.array([[0, seq_length + 1]] * args.batch_size)
    mx.reset_peak_memory()
    for _ in range(args.warmup):
        mx.eval(step(batch, lengths, None, True), state)
    tic = time.perf_counter()
    for _ in range(args.steps):
        loss, _, _ = step(batch, lengths, None, True)
        mx.eval(loss, state)
    seconds = (time.perf_counter() - tic) / args.steps
    return {
        "impl": impl,
        "seq_length": seq_length,
        "batch_size": args.batch_size,
        "grad_checkpoint": checkpointing,
        "tokens_per_second": round(args.batch_size * seq_length / seconds, 2),
        "seconds_per_step": round(seconds, 4),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
        "weights_memory_gb": round(weights_gb, 3),
        "loss": round(loss.item(), 4),
        "device": str(mx.default_device()),
        "layers": args.layers,
        "width_scale": args.width_scale,
        "hidden_size": config["hidden_size"],
        "experts": args.experts,
        "vocab": args.vocab,
        "lora_layers": args.lora_layers,
        "targets": args.targets,
        "rank": args.rank,
        "bits": args.bits,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--seq-lengths", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--grad-checkpoint", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--layers", type=int, default=A13B["num_hidden_layers"])
    p.add_argument("--width-scale", type=float, default=1.0, help="Heads, hidden and MLP width.")
    p.add_argument("--experts", type=int, default=A13B["num_experts"])
    p.add_argument("--vocab", type=int, default=A13B["vocab_size"])
    p.add_argument("--lora-layers", type=int, default=16, help="mlx-lm's default; -1 for all.")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument(
        "--targets", nargs="+", choices=LORA_GROUPS, default=list(LORA_GROUPS), help="LoRA on these"
    )
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps (compilation).")
    p.add_argument("--steps", type=int, default=5, help="Timed steps.")
    p.add_argument("--row-timeout", type=float, default=None, help="Seconds per measurement.")
    p.add_argument("--one", help=argparse.SUPPRESS)  # impl:seq_length:on|off, in a child
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.one:
        impl, seq_length, checkpointing = args.one.split(":")
        print(json.dumps(measure(impl, int(seq_length), checkpointing == "on", args)), flush=True)
        return
    for checkpointing in args.grad_checkpoint:
        for seq_length in args.seq_lengths:
            for impl in args.impls:
                one = f"{impl}:{seq_length}:{checkpointing}"
                command = [sys.executable, "-m", "benchmarks.bench_lora", *sys.argv[1:]]
                command += ["--one", one]
                try:
                    timeout = args.row_timeout
                    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:  # the child is killed, not left on the GPU
                    row = {"impl": impl, "seq_length": seq_length, "error": f"over {timeout} s"}
                    print(json.dumps({**row, "grad_checkpoint": checkpointing == "on"}), flush=True)
                    continue
                if done.returncode == 0:
                    print(done.stdout.strip().splitlines()[-1], flush=True)
                else:
                    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"impl": impl, "seq_length": seq_length, "error": error}
                    print(json.dumps({**row, "grad_checkpoint": checkpointing == "on"}), flush=True)


if __name__ == "__main__":
    main()
