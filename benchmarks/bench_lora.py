"""QLoRA training speed and peak memory: hunyuan-mlx beside mlx-lm's own HunYuan model.

Both models get the same shape (Hunyuan-A13B by default, or scaled down with --layers and
--width-scale), random 4-bit weights made directly as packed bits and scales (no bf16 model is
ever built), rank-r LoRA on the same modules (attention, shared MLP, routed experts) of the last
--lora-layers layers, and the same compiled Adam step on random tokens. Each measurement runs in a
fresh process, so peak memory is its own, and prints one JSON line:

    python -m benchmarks.bench_lora                                   # A13B, on a GPU
    python -m benchmarks.bench_lora --layers 2 --width-scale 0.0625 --vocab 4096 \\
        --seq-lengths 128 256 --steps 3                                # a quick CPU check
    python -m benchmarks.bench_lora --impls hunyuan_mlx --fast-paths metal cuda off ...

`--fast-paths` names ours's policies (`FastPaths.named`: a backend's built-in defaults, `off`
the plain path, `auto` this machine's), one row each; every row prints the policy it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from benchmarks.a13b import EMBED_SCALE, median_ms, random_quantized
from hunyuan_mlx.models.fast_paths import POLICY_NAMES
from hunyuan_mlx.models.quantization import QUANT_RECIPES

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
# hunyuan_mlx_plain: ours with every fast path off (gathered experts, compiled step), as before
# the padded experts reached training: `hunyuan_mlx` under `--fast-paths off`.
IMPLS = ("hunyuan_mlx", "hunyuan_mlx_plain", "mlx_lm")
# The same modules in each implementation's names, by this project's target group.
LORA_GROUPS = ("attention", "shared_mlp", "experts")
MLX_LM_KEYS = {
    "attention": [f"self_attn.{p}_proj" for p in "qkvo"],
    "shared_mlp": [f"mlp.shared_mlp.{p}_proj" for p in ("gate", "up", "down")],
    "experts": [f"mlp.switch_mlp.{p}_proj" for p in ("gate", "up", "down")],
}


def lora_keys(impl: str, groups: list[str]) -> list[str]:
    if impl != "mlx_lm":
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


def randomize_quantized(model: nn.Module) -> None:
    """Give every quantized module random packed weights and scales as the generation benchmarks
    do (`a13b.random_quantized`), never computing the float weights it was built from (they stay
    unevaluated and are dropped)."""
    for path, module in model.named_modules():
        if "scales" in module:
            scale = EMBED_SCALE if path.endswith("embed_tokens") else 1.0
            random_quantized(module, mx.bfloat16, scale)


def build(
    impl: str,
    config: dict[str, Any],
    checkpointing: bool,
    args: argparse.Namespace,
    fast_paths: str = "auto",
) -> nn.Module:
    """The random 4-bit model of one implementation, with LoRA and optional checkpointing; ours
    under the policy `fast_paths` names (`FastPaths.named`)."""
    quant = {"group_size": args.group_size, "bits": args.bits, "mode": "affine"}
    keys = lora_keys(impl, args.targets)
    lora = {"rank": args.rank, "scale": 20.0, "dropout": 0.0, "keys": keys}
    if impl != "mlx_lm":
        from hunyuan_mlx import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
        from hunyuan_mlx.models.fast_paths import FastPaths, set_fast_paths
        from hunyuan_mlx.models.quantization import apply_quantization, is_router, recipe_params
        from hunyuan_mlx.tuner.adapters import prepare_model
        from hunyuan_mlx.tuner.trainer import checkpoint_layers

        model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config.from_dict(config))
        for path, module in model.named_modules():  # --recipe: the converter's rule, per module
            if hasattr(module, "to_quantized") and not is_router(path):
                bits = recipe_params(args.recipe, path, quant)["bits"]
                if bits != args.bits:
                    quant[path] = {"bits": bits}
        apply_quantization(model, quant)
        randomize_quantized(model)
        set_fast_paths(model, FastPaths.named("off" if impl == "hunyuan_mlx_plain" else fast_paths))
        overrides = {}  # --expert-group, --piece-rows
        if args.expert_group:
            overrides["padded_expert_group"] = args.expert_group
            overrides["padded_training_expert_group"] = args.expert_group
        if args.piece_rows is not None:
            overrides["gathered_piece_rows"] = args.piece_rows or None
        if impl != "hunyuan_mlx_plain" and overrides:
            set_fast_paths(model, dataclasses.replace(model.fast_paths, **overrides))
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
        randomize_quantized(model)
        model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
        model.freeze()
        linear_to_lora_layers(model, args.lora_layers, lora)
        if checkpointing:
            grad_checkpoint(model.layers[0])
    mx.eval(model.parameters())
    return model


def phase_peaks(step: Callable, batch: mx.array, lengths: mx.array, state: Any) -> dict:
    """Peak GB of one layer-at-a-time step by phase: the forward and the loss, the highest layer
    vjp, the optimizer update (with the gradients), and what stays live after the step."""
    from hunyuan_mlx.tuner import layerwise

    original, peaks = layerwise.layer_vjp, {"layer_vjp": 0.0}

    def recorded(*args: Any) -> Any:
        peaks.setdefault("forward_and_loss", mx.get_peak_memory() / 1e9)
        mx.reset_peak_memory()
        out = original(*args)
        mx.eval(out)
        peaks["layer_vjp"] = max(peaks["layer_vjp"], mx.get_peak_memory() / 1e9)
        mx.reset_peak_memory()
        return out

    layerwise.layer_vjp = recorded
    try:
        mx.reset_peak_memory()
        mx.eval(step(batch, lengths, None, True), state)
    finally:
        layerwise.layer_vjp = original
    peaks["update"] = mx.get_peak_memory() / 1e9
    peaks["live_after"] = mx.get_active_memory() / 1e9
    return {k: round(v, 3) for k, v in peaks.items()}


def one_graph_peaks(model: nn.Module, batch: mx.array, lengths: mx.array, state: Any) -> dict:
    """Where the one-graph step's memory goes, peak GB by phase: the forward and loss outside any
    transformation, the head and loss with their gradient on the final hidden states alone (the
    whole sequence's float32 logits), and the whole step; what the step holds beyond the first
    two is the tuned layers' activations kept for the backward."""
    from hunyuan_mlx.models.hf_compat import masked_cross_entropy
    from hunyuan_mlx.tuner.data import split_batch
    from hunyuan_mlx.tuner.trainer import masked_loss

    inputs, targets, mask = split_batch(batch, lengths)
    h = model.model(inputs)
    mx.eval(h)
    peaks = {}
    mx.reset_peak_memory()
    mx.eval(masked_loss(model, batch, lengths))
    peaks["forward_and_loss"] = mx.get_peak_memory() / 1e9

    def head_loss(h: mx.array) -> mx.array:
        return masked_cross_entropy(model.lm_head_logits(h), targets, mask)[0]

    mx.reset_peak_memory()
    mx.eval(mx.value_and_grad(head_loss)(h))
    peaks["head_and_loss_grad"] = mx.get_peak_memory() / 1e9
    del h
    mx.reset_peak_memory()
    mx.eval(nn.value_and_grad(model, masked_loss)(model, batch, lengths))
    peaks["value_and_grad"] = mx.get_peak_memory() / 1e9
    return {k: round(v, 3) for k, v in peaks.items()}


def measure(
    impl: str, seq_length: int, checkpointing: bool, args: argparse.Namespace, fast_paths: str
) -> dict[str, Any]:
    """Build, warm up (compile), then time `--steps` training steps of one configuration."""
    from hunyuan_mlx.tuner.layerwise import takes_layerwise
    from hunyuan_mlx.tuner.trainer import training_step

    mx.random.seed(0)
    config = model_config(args)
    model = build(impl, config, checkpointing, args, fast_paths)
    weights_gb = mx.get_active_memory() / 1e9
    step, state = training_step(model, optim.Adam(learning_rate=1e-5))
    batch = mx.random.randint(0, config["vocab_size"], (args.batch_size, seq_length + 1))
    lengths = mx.array([[0, seq_length + 1]] * args.batch_size)
    mx.reset_peak_memory()
    for _ in range(args.warmup):
        mx.eval(step(batch, lengths, None, True), state)
    tic, losses = time.perf_counter(), []
    for _ in range(args.steps):
        loss, _, _ = step(batch, lengths, None, True)
        mx.eval(loss, state)
        losses.append(loss)
    seconds = (time.perf_counter() - tic) / args.steps
    peak_gb = mx.get_peak_memory() / 1e9
    ours = impl != "mlx_lm"
    layerwise = ours and takes_layerwise(model)
    phases = None
    if args.phases and layerwise:
        phases = phase_peaks(step, batch, lengths, state)
    elif args.phases and ours:
        phases = one_graph_peaks(model, batch, lengths, state)
    return {
        "phase_peak_gb": phases,
        "impl": impl,
        "fast_paths": fast_paths if impl == "hunyuan_mlx" else None,
        "policy": dataclasses.asdict(model.fast_paths) if ours else None,
        "layerwise": layerwise,
        "seq_length": seq_length,
        "batch_size": args.batch_size,
        "grad_checkpoint": checkpointing,
        "tokens_per_second": round(args.batch_size * seq_length / seconds, 2),
        "seconds_per_step": round(seconds, 4),
        "peak_memory_gb": round(peak_gb, 3),
        "weights_memory_gb": round(weights_gb, 3),
        "losses": [round(x.item(), 5) for x in losses],  # the timed steps', on one batch
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
        "recipe": args.recipe,
        "expert_group": None if impl == "mlx_lm" else model.fast_paths.padded_training_expert_group,
    }


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median milliseconds of `fn()` evaluated (after one untimed call), and its peak memory
    above what was live before it, in GB."""
    mx.eval(fn())
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    ms = median_ms(fn, reps)
    return ms, (mx.get_peak_memory() - base) / 1e9


def profile(seq_length: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Forward and forward+backward time of each part of one tuned layer of ours (gradients of
    its adapters and of its input, as in training), the loss on the 128K head, and the
    optimizer update of every tuned layer's adapters: where a training step's time goes."""
    from hunyuan_mlx.models.fast_paths import FastPaths, using
    from hunyuan_mlx.models.hf_compat import masked_cross_entropy

    mx.random.seed(0)
    config = model_config(args)
    model = build(
        "hunyuan_mlx", config, False, argparse.Namespace(**{**vars(args), "lora_layers": -1})
    )
    model.train()
    layer, moe = model.layers[-1], model.layers[-1].mlp
    x = (mx.random.normal((args.batch_size, seq_length, config["hidden_size"])) * 0.5).astype(
        mx.bfloat16
    )
    indices, weights = moe.route(x)
    targets = mx.random.randint(0, config["vocab_size"], x.shape[:2])
    mask = mx.ones(targets.shape, dtype=mx.bool_)
    padded, plain = model.fast_paths, FastPaths.off()  # padded: the default, --expert-group
    parts: dict[str, Callable[[mx.array], mx.array]] = {
        "attention": lambda h: layer.self_attn(layer.input_layernorm(h), "causal")[0],
        "router": lambda h: moe.route(h)[1],
        "routed_experts_gathered": lambda h: using_plain(lambda: moe.experts(h, indices, weights)),
        "routed_experts_padded": lambda h: moe.experts(h, indices, weights),
        "shared_expert": lambda h: moe.shared_mlp(h),
        "decoder_layer_padded": lambda h: layer(h, "causal")[0],
        "decoder_layer_gathered": lambda h: using_plain(lambda: layer(h, "causal")[0]),
        "head_and_loss": lambda h: masked_cross_entropy(
            model.lm_head_logits(model.model.norm(h)), targets, mask
        )[0],
    }

    def using_plain(fn: Callable[[], mx.array]) -> mx.array:
        with using(model, plain):
            return fn()

    params = layer.trainable_parameters()
    rows = []
    for name, fn in parts.items():

        def loss(p: Any, h: mx.array, fn: Callable = fn) -> mx.array:
            layer.update(p)
            return fn(h).astype(mx.float32).sum()

        grad = mx.grad(loss, argnums=(0, 1))
        fwd_ms, fwd_gb = timed(lambda fn=fn: fn(x), args.steps)
        bwd_ms, bwd_gb = timed(lambda grad=grad: grad(params, x), args.steps)
        rows.append(
            {
                "part": name,
                "forward_ms": fwd_ms,
                "forward_backward_ms": bwd_ms,
                "forward_peak_gb": fwd_gb,
                "forward_backward_peak_gb": bwd_gb,
            }
        )
    optimizer = optim.Adam(learning_rate=1e-5)
    tuned = {str(i): layer.trainable_parameters() for i in range(args.lora_layers)}
    optimizer.init(tuned)
    update_ms, update_gb = timed(lambda: optimizer.apply_gradients(tuned, tuned), args.steps)
    rows.append(
        {
            "part": f"adam_update_{args.lora_layers}_layers",
            "forward_ms": update_ms,
            "forward_peak_gb": update_gb,
        }
    )
    head = {
        "bench": "lora_profile",
        "seq_length": seq_length,
        "device": str(mx.default_device()),
        "targets": args.targets,
        "expert_group": padded.padded_training_expert_group,
    }
    return [{**head, **row} for row in rows]


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
    p.add_argument(
        "--recipe",
        choices=QUANT_RECIPES,
        default="uniform",
        help="Ours only: --bits for the "
        "routed experts, mixed_N: N bits for the rest (the converter's --quant-recipe).",
    )
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps (compilation).")
    p.add_argument("--steps", type=int, default=5, help="Timed steps.")
    p.add_argument("--row-timeout", type=float, default=None, help="Seconds per measurement.")
    p.add_argument(
        "--expert-group", type=int, default=None, help="Ours: experts per padded matmul (training)."
    )
    p.add_argument(
        "--piece-rows",
        type=int,
        default=None,
        help="Ours: routed rows per piece of the gathered experts, 0 for one graph "
        "(FastPaths.gathered_piece_rows; default: the policy's).",
    )
    p.add_argument(
        "--phases", action="store_true", help="Ours: peak memory by phase of one more step."
    )
    p.add_argument(
        "--profile", action="store_true", help="Time the parts of one layer and the loss instead."
    )
    p.add_argument(
        "--fast-paths",
        nargs="+",
        choices=POLICY_NAMES,
        default=["auto"],
        help="Ours: the policies to run, one row each (default: auto, this machine's).",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # impl:seq_length:on|off:policy, in a child
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.profile:
        for seq_length in args.seq_lengths:
            for row in profile(seq_length, args):
                print(json.dumps(row), flush=True)
        return
    if args.one:
        impl, seq_length, checkpointing, fast_paths = args.one.split(":")
        row = measure(impl, int(seq_length), checkpointing == "on", args, fast_paths)
        print(json.dumps(row), flush=True)
        return
    runs = [
        (impl, policy)
        for impl in args.impls
        for policy in (args.fast_paths if impl == "hunyuan_mlx" else ["auto"])
    ]
    for checkpointing in args.grad_checkpoint:
        for seq_length in args.seq_lengths:
            for impl, policy in runs:
                one = f"{impl}:{seq_length}:{checkpointing}:{policy}"
                command = [sys.executable, "-m", "benchmarks.bench_lora", *sys.argv[1:]]
                command += ["--one", one]
                row = {"impl": impl, "fast_paths": policy, "seq_length": seq_length}
                row["grad_checkpoint"] = checkpointing == "on"
                try:
                    timeout = args.row_timeout
                    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:  # the child is killed, not left on the GPU
                    print(json.dumps({**row, "error": f"over {timeout} s"}), flush=True)
                    continue
                if done.returncode == 0:
                    print(done.stdout.strip().splitlines()[-1], flush=True)
                else:
                    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    print(json.dumps({**row, "error": error}), flush=True)


if __name__ == "__main__":
    main()
