"""Splitting a loaded (still unevaluated) model over the ranks of an `mx.distributed` group.

The model's `shard(group)` and its decoder's `pipeline(group)` (mlx-lm's protocol) run them.

- **Tensor mode** (`shard_tensor`): each rank keeps 1/N of the query and key-value heads, 1/N of
  every routed expert's intermediate dimension (all 64 experts on every rank, as mlx-lm's
  `qwen3_moe.py` / `deepseek_v3.py` `shard()`) and of the shared expert's. The router, norms and
  embedding stay whole. Each block's output is a partial sum that one `all_sum` completes: one
  for attention (`HunYuanMoEV1Attention.sharding_group`), one for the MoE block, routed and
  shared experts together (`HunYuanMoEV1Moe.sharding_group`).
- **Pipeline mode** (`pipeline_stage`): each rank keeps a contiguous run of layers; hidden states go
  from stage to stage through `all_sum`s to which only the sender adds (`stage_input`,
  `stage_output`): every backend has `all_sum`, MLX 0.32.4's CUDA one has no `recv`.

Both work on the parameters by name, so a module wrapped by LoRA (`linear`, `lora_a`, `lora_b`)
is split too: its factors along the same features as its base. Sharding slices the lazy arrays
`mx.load` returns: a rank reads whole tensors from the files but keeps only its slices.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from .config import HunYuanMoEV1Config

Axis = int | tuple[int, int] | None  # shard_inplace's answer: axis, (axis, segments), or whole


def split_outputs(segments: int = 1):
    """The `shard_inplace` rule for a projection whose output features are split over the ranks
    (q/k/v, gate/up): weight rows; a LoRA's `lora_b` columns (its `lora_a` reads all inputs)."""

    def axis(path: str, w: mx.array) -> Axis:
        name = path.rsplit(".", 1)[-1]
        if name == "lora_a":
            return None
        if name == "lora_b":  # (r, out) for LoRALinear, (E, out, r) for gathered experts
            return (-1 if w.ndim == 2 else -2), segments
        if name in ("bias", "m"):  # a Linear's bias, a DoRA magnitude: one entry per output
            return -1, segments
        return -2, segments  # weight, scales, biases (quantization): output rows

    return axis


def split_inputs(path: str, w: mx.array) -> Axis:
    """The `shard_inplace` rule for a projection whose input features are split (o_proj, down):
    weight columns; a LoRA's `lora_a` rows over the input (its `lora_b` maps the rank-r sum)."""
    name = path.rsplit(".", 1)[-1]
    if name == "lora_a":  # (in, r) for LoRALinear, (E, r, in) for gathered experts
        return 0 if w.ndim == 2 else -1
    if name in ("lora_b", "bias"):
        return None
    return -1


def shard_rows_out(module: nn.Module, group: mx.distributed.Group, segments: int = 1) -> None:
    """Keep this rank's share of `module`'s output features, in place."""
    shard_inplace(module, split_outputs(segments), group=group)


def shard_rows_in(module: nn.Module, group: mx.distributed.Group, where: str) -> None:
    """Keep this rank's share of `module`'s input features, in place. Its output is then a partial
    sum; a bias is kept on rank 0 only, so the sum adds it once. `where` names it in errors."""
    if "m" in module:  # DoRA's magnitude, divided by a norm over every input of each row
        raise ValueError(
            f"DoRA adapters on {where} cannot be split over ranks in tensor mode (their norm "
            "needs every input): use --pipeline, or fuse the adapters first (hunyuan_mlx.fuse)"
        )
    shard_inplace(module, split_inputs, group=group)  # builds the new tree whole, then swaps
    for _, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.QuantizedLinear)) and "bias" in sub and group.rank():
            sub.bias = mx.zeros_like(sub.bias)


def shard_tensor(model: nn.Module, group: mx.distributed.Group) -> None:
    """Tensor mode, in place: this rank's heads, expert and shared-expert slices (module doc)."""
    n = group.size()
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            if name in attn:
                shard_rows_out(attn[name], group)
        shard_rows_in(attn.o_proj, group, f"layer {i}'s self_attn.o_proj")
        attn.num_heads //= n
        attn.num_key_value_heads //= n
        attn.sharding_group = group
        moe = layer.mlp
        # gate_up_proj stacks gate rows then up rows: each rank takes its share of both.
        shard_rows_out(moe.experts.gate_up_proj, group, segments=2)
        shard_rows_in(moe.experts.down_proj, group, f"layer {i}'s mlp.experts.down_proj")
        moe.experts.intermediate_size //= n
        if "shared_mlp" in moe:
            shard_rows_out(moe.shared_mlp.gate_proj, group)
            shard_rows_out(moe.shared_mlp.up_proj, group)
            shard_rows_in(moe.shared_mlp.down_proj, group, f"layer {i}'s shared_mlp.down_proj")
        moe.sharding_group = group


def pipeline_stage(config: HunYuanMoEV1Config, size: int, rank: int) -> tuple[int, int]:
    """Layers [first, end) of `rank`: contiguous runs, the first ranks one longer when `size`
    does not divide the layer count. With cross-layer attention a stage must start a K/V group."""
    layers = config.num_hidden_layers
    if size > layers:
        raise ValueError(f"Pipeline mode needs a layer per rank: {layers} layers, {size} ranks")
    base, extra = divmod(layers, size)
    starts = [r * base + min(r, extra) for r in range(size + 1)]
    for r, start in enumerate(starts[1:-1], 1):
        if not config.layer_has_kv_proj(start):
            raise ValueError(
                f"Pipeline mode would start rank {r} at layer {start}, inside a group of "
                f"{config.cla_share_factor} layers sharing keys and values (CLA): use a rank "
                "count that splits the layers at group boundaries"
            )
    return starts[rank], starts[rank + 1]


def _hand_off(h: mx.array, group: mx.distributed.Group) -> mx.array:
    """One hand-off between stages: an `all_sum` in which only the sender's `h` is not zero,
    evaluated now, so that every rank runs the same collectives in the same order (a rank that
    does not use a hand-off's result would otherwise never run it, and the others would wait)."""
    out = mx.distributed.all_sum(h, group=group)
    mx.eval(out)
    return out


def stage_input(h: mx.array, group: mx.distributed.Group, dtype: mx.Dtype) -> mx.array:
    """The hidden states this stage starts from: the embeddings on the first stage; on stage r,
    what stage r - 1 handed off (in `dtype`), after the hand-offs before it (only `h`'s shape
    is used there).

    Hand-offs are `all_sum`s, not `send`/`recv`: MLX 0.32.4's CUDA backend has no `recv`, and
    the hidden state of a step is small (hidden x 2 bytes a token) beside the layers' work.
    """
    rank = group.rank()
    if rank == 0:
        return h
    zeros = mx.zeros(h.shape, dtype)
    for _ in range(rank):  # hand-offs 0 -> 1, ..., rank - 1 -> rank
        received = _hand_off(zeros, group)
    return received


def stage_output(h: mx.array, group: mx.distributed.Group, dtype: mx.Dtype) -> mx.array:
    """Every stage's copy of the last stage's output: this stage hands its output on, takes part
    in the later hand-offs with zeros, and the last hand-off (from the last stage to all) gives
    every rank the same output, so every rank samples the same token."""
    rank, size = group.rank(), group.size()
    h = h.astype(dtype)
    zeros = mx.zeros_like(h)
    out = _hand_off(h, group)  # hand-off rank -> rank + 1 (the last stage's: to every rank)
    for _ in range(rank + 1, size):  # the later hand-offs
        out = _hand_off(zeros, group)
    return out


def stage_dtype(embeddings: mx.array, norm: nn.Module) -> mx.Dtype:
    """The dtype hidden states cross stages in: what the layers make of the embeddings (a
    quantized embedding gives bf16, float32 norms lift the layers' outputs to float32). Every
    stage computes the same, so a receiver knows what its sender sends."""
    return mx.result_type(embeddings.dtype, norm.weight.dtype)
