"""Every fast path gives the plain path's logits (and transformers' to 1e-4 in float32)."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from helpers import FAST_PATHS_CONFIG, greedy_steps
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache

from hunyuan_mlx import load_model
from hunyuan_mlx.models import FastPaths, HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
from hunyuan_mlx.models import experts as ex
from hunyuan_mlx.models import fast_paths as fp
from hunyuan_mlx.models.experts import GatheredGLU, call_experts
from hunyuan_mlx.models.quantization import apply_quantization
from hunyuan_mlx.tuner import layerwise
from hunyuan_mlx.tuner.adapters import prepare_model
from hunyuan_mlx.tuner.layerwise import layerwise_loss_and_grad, takes_layerwise
from hunyuan_mlx.tuner.trainer import checkpoint_layers, masked_loss, training_step

ATOL = 1e-4


PLAIN = FastPaths.off()


@pytest.fixture
def always_fast(monkeypatch):
    """Take the padded path from the first routed row on this backend, float32 rows included
    (in every default policy made during the test)."""
    monkeypatch.setitem(fp.PADDED_MIN_ROWS, fp.backend(), 1)
    monkeypatch.setattr(fp, "PADDED_HALF_PRECISION_ONLY", ())


@pytest.fixture
def spy(monkeypatch):
    """Records, per experts call that tries the padded path, whether it took it (its grid was
    planned: not inside mx.compile)."""
    taken = []
    original = ex.PaddedGrid.plan

    def plan(cls, *args, **kwargs):
        grid = original(*args, **kwargs)
        taken.append(grid is not None)
        return grid

    monkeypatch.setattr(ex.PaddedGrid, "plan", classmethod(plan))
    return taken


@pytest.fixture
def grouped(monkeypatch):
    """Records each layer vjp the trainer takes a padded expert group at a time."""
    calls = []
    original = layerwise.grouped_vjp

    def recorded(*args):
        calls.append(True)
        return original(*args)

    monkeypatch.setattr(layerwise, "grouped_vjp", recorded)
    return calls


def experts_call(glu: GatheredGLU, policy: FastPaths | None = None) -> GatheredGLU:
    """`glu`, to be called as the MoE block calls it, under `policy` (default: this backend's)."""
    fp.set_fast_paths(glu, policy or FastPaths.default())
    return glu


def tiny_model(quantized: bool, seed: int = 0) -> HunYuanMoEV1ForCausalLM:
    mx.random.seed(seed)
    config = HunYuanMoEV1Config(**FAST_PATHS_CONFIG)
    model = HunYuanMoEV1ForCausalLM(config)
    if quantized:
        apply_quantization(model, {"group_size": 32, "bits": 4})
    model.eval()
    mx.eval(model.parameters())
    return model


def routing(tokens: int, num_experts: int = 16, k: int = 4) -> tuple[mx.array, mx.array]:
    """Random top-k expert ids and renormalised weights for (1, tokens)."""
    indices = mx.argsort(mx.random.uniform(shape=(1, tokens, num_experts)), axis=-1)[..., :k]
    return indices, mx.softmax(mx.random.normal((1, tokens, k)), axis=-1)


def experts_and_call(quantized: bool, tokens: int) -> tuple[GatheredGLU, mx.array, ...]:
    """Random experts (16 of width 128, 4-bit if `quantized`) in eval mode, and a call's input
    and routing for `tokens` tokens."""
    glu = GatheredGLU(128, 64, 16)
    if quantized:
        nn.quantize(glu, 32, 4)
    glu.eval()
    return glu, mx.random.normal((1, tokens, 128)), *routing(tokens)


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.mark.parametrize("group", [3, 32])  # experts per batched matmul
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("tokens", [2, 7, 64])  # 2 tokens x 4 of 16 experts: some unused
def test_padded_experts_equal_gathered(quantized, tokens, group, always_fast, spy):
    glu, x, indices, weights = experts_and_call(quantized, tokens)
    fast = experts_call(glu, dataclasses.replace(FastPaths.default(), padded_expert_group=group))(
        x, indices, weights
    )
    plain = experts_call(glu, PLAIN)(x, indices, weights)
    assert spy == [True]
    assert fast.shape == plain.shape == (1, tokens, 128)
    assert max_diff(fast, plain) <= 1e-5


def skewed_routing(tokens: int) -> tuple[mx.array, mx.array]:
    """Every token picks expert 5 first, most pick 6 second, the rest spread (experts 0..15)."""
    t = mx.arange(tokens)[None, :, None]
    rest = mx.concatenate([7 + t % 9, 7 + (t + 4) % 9], axis=-1)
    second = mx.where(t % 5 == 0, 3, 6)
    indices = mx.concatenate([mx.full((1, tokens, 1), 5), second, rest], axis=-1)
    mx.eval(indices)
    assert all(len(set(row)) == 4 for row in indices[0].tolist())  # k distinct experts
    return indices.astype(mx.uint32), mx.softmax(mx.random.normal((1, tokens, 4)), axis=-1)


def test_padded_blocks_cover_every_row_once_within_three_times_the_rows():
    counts = [0, 3, 200, 0, 9, 1, 40, 0]  # one expert far busier than the others
    capacity, blocks = ex.padded_blocks(counts)
    assert capacity % 8 == 0 and len(blocks) * capacity <= 3 * sum(counts)
    covered = [row for _, first, size in blocks for row in range(first, first + size)]
    assert covered == list(range(sum(counts)))
    per_expert = {e: sum(size for x, _, size in blocks if x == e) for e in range(len(counts))}
    assert list(per_expert.values()) == counts
    assert ex.padded_blocks([4, 4, 5]) == (8, [(0, 0, 4), (1, 4, 4), (2, 8, 5)])  # one block each


@pytest.mark.parametrize("group", [3, 32])
@pytest.mark.parametrize("quantized", [False, True])
def test_padded_experts_equal_gathered_on_skewed_routing(quantized, group, always_fast, spy):
    """A busy expert spans several blocks, and its weights repeat within a group."""
    glu = GatheredGLU(128, 64, 16)
    if quantized:
        nn.quantize(glu, 32, 4)
    glu.eval()
    x = mx.random.normal((1, 50, 128))
    indices, weights = skewed_routing(50)
    policy = dataclasses.replace(FastPaths.default(), padded_expert_group=group)
    fast = experts_call(glu, policy)(x, indices, weights)
    plain = experts_call(glu, PLAIN)(x, indices, weights)
    assert spy == [True]
    assert max_diff(fast, plain) <= 1e-5


@pytest.mark.parametrize("quantized", [False, True])
def test_chunked_prefill_and_decode_logits_equal_plain(quantized, always_fast, spy):
    """The generation loop's calls (prefill chunks with a cache, then single tokens)."""
    model = tiny_model(quantized)
    ids = mx.random.randint(0, 200, (1, 70))

    def run():
        cache = model.make_cache()
        out = [model(ids[:, a:b], cache=cache) for a, b in ((0, 40), (40, 69), (69, 70))]
        return mx.concatenate(out, axis=1)

    fast = run()
    assert any(spy)
    assert all(layer._decode_fns is not None for layer in model.layers)  # compiled decode ran
    with fp.using(model, PLAIN):
        plain = run()
    assert max_diff(fast, plain) <= ATOL


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("tokens", [1, 2, 13])
def test_every_expert_on_every_token_equals_gathered(quantized, tokens):
    """Every expert on every token, scaled by the routing weights (zero where not chosen), is the
    gathered kernel's sum; quantized experts in inference only (what was measured), unquantized
    ones and training keep the gathered kernel."""
    glu, x, indices, weights = experts_and_call(quantized, tokens)
    plain = experts_call(glu, PLAIN)(x, indices, weights)
    every = experts_call(glu, FastPaths(every_expert_from=4))
    assert every.kernel(indices.size, x.dtype) == ("every expert" if quantized else "gathered")
    assert max_diff(every(x, indices, weights), plain) <= 1e-5
    # Fewer routed rows than experts run that many experts, every routed one among them.
    slots = call_experts(indices, 16).tolist()
    assert len(slots) == min(16, indices.size) and set(indices.flatten().tolist()) <= set(slots)
    every.train()  # measured in inference only: training keeps the gathered kernel
    assert every.kernel(indices.size, x.dtype) == "gathered"


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("policy", ["this backend's", "cuda"])
def test_batched_decode_is_compiled_and_equals_plain(quantized, policy, monkeypatch):
    """The server's batched decode (mlx-lm's BatchKVCache: left padding, an offset per sequence,
    an array mask) takes the compiled step and gives the plain path's logits; under the CUDA
    policy a batch of 2 x top-4 rows runs every expert on every token (from 8 rows here)."""
    monkeypatch.setitem(fp.EVERY_EXPERT_FROM, "cuda", 8)
    model = tiny_model(quantized)
    fp.set_fast_paths(model, FastPaths.default(on="cuda" if policy == "cuda" else None))
    kernels = []
    original = GatheredGLU.every_expert

    def every_expert(self, *args):
        kernels.append(True)
        return original(self, *args)

    monkeypatch.setattr(GatheredGLU, "every_expert", every_expert)
    prompts = [mx.random.randint(0, 200, (n,)).tolist() for n in (9, 14)]
    steps = mx.random.randint(0, 200, (4, 2, 1))

    def run():
        cache = [BatchKVCache(left_padding=[5, 0]) for _ in model.layers]
        ids = mx.array([[0] * 5 + prompts[0], prompts[1]])
        out = [model(ids, cache=cache)[:, -1:]]
        out += [model(step, cache=cache) for step in steps]
        return mx.concatenate(out, axis=1)

    fast = run()
    assert all(layer._decode_fns is not None for layer in model.layers)  # compiled decode ran
    assert bool(kernels) == (policy == "cuda" and quantized)
    with fp.using(model, PLAIN):
        plain = run()
    assert max_diff(fast, plain) <= ATOL


def test_a_new_policy_retraces_the_compiled_decode_step(monkeypatch):
    """The kernels a policy chose are traced into the compiled decode step: a policy given later
    (`set_fast_paths`, `using`) compiles the step anew rather than keep the old kernels."""
    model = tiny_model(quantized=True)
    steps = []
    original = GatheredGLU.every_expert

    def every_expert(self, *args):
        steps.append(args[0].shape[1])  # tokens of the call: 1 in a decode step
        return original(self, *args)

    monkeypatch.setattr(GatheredGLU, "every_expert", every_expert)

    def decode():
        cache = [BatchKVCache(left_padding=[0, 0]) for _ in model.layers]
        model(mx.ones((2, 3), mx.int32), cache=cache)
        return model(mx.ones((2, 1), mx.int32), cache=cache)

    decode()  # this backend's policy: no every-expert kernel, the step compiled
    assert steps == []
    with fp.using(model, dataclasses.replace(FastPaths.default(), every_expert_from=8)):
        decode()
    assert steps.count(1) == len(model.layers)  # the decode step traced anew, every layer


def test_compiled_decode_sees_new_weights():
    """The compiled decode step takes the layer's parameters as inputs: no stale weights."""
    model = tiny_model(quantized=True)
    ids = mx.random.randint(0, 200, (1, 12))

    def last_logits():
        cache = model.make_cache()
        model(ids[:, :-1], cache=cache)
        return model(ids[:, -1:], cache=cache)

    last_logits()  # compiles
    layer = model.layers[1]
    layer.mlp.shared_mlp.down_proj.scales = layer.mlp.shared_mlp.down_proj.scales * 2
    layer.post_attention_layernorm.weight = layer.post_attention_layernorm.weight * 0.5
    fast = last_logits()
    with fp.using(model, PLAIN):
        plain = last_logits()
    assert max_diff(fast, plain) <= ATOL


def test_fast_path_matches_transformers(tiny_checkpoint, always_fast, spy):
    path, torch_model = tiny_checkpoint
    model = load_model(path)
    ids = np.random.default_rng(3).integers(0, 96, (1, 40))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.float().numpy()
    ours = np.array(model(mx.array(ids)).astype(mx.float32))
    assert all(spy) and spy
    assert np.abs(ours - ref).max() <= ATOL


def test_compile_takes_the_gathered_path(always_fast, spy):
    model = tiny_model(quantized=False)
    ids = mx.random.randint(0, 200, (1, 30))
    with fp.using(model, PLAIN):
        plain = model(ids)
    compiled = mx.compile(lambda t: model(t))
    assert max_diff(compiled(ids), plain) <= ATOL
    assert spy and not any(spy)  # tried, declined: no host read inside mx.compile


@pytest.mark.parametrize("quantized", [False, True])
def test_gathered_experts_in_pieces_equal_one_graph_within_less_memory(quantized):
    """A long inference call of the gathered experts goes in pieces, each evaluated before the
    next: the same outputs, a fraction of one graph's working memory; inside mx.compile (which
    cannot evaluate) one graph, still equal."""
    glu = tiny_model(quantized).layers[0].mlp.experts
    x = mx.random.normal((1, 1024, glu.gate_up_proj.dims[1]))
    indices, weights = routing(1024)
    mx.eval(x, indices, weights)

    def peak_and_out(pieces: int | None) -> tuple[int, mx.array]:
        fp.set_fast_paths(glu, FastPaths(gathered_piece_rows=pieces))
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = glu(x, indices, weights)
        mx.eval(out)
        return mx.get_peak_memory() - base, out

    whole, expected = peak_and_out(None)
    pieces, out = peak_and_out(512)
    assert max_diff(out, expected) <= 1e-5
    assert pieces < whole / 2
    compiled = mx.compile(lambda x: glu(x, indices, weights))
    assert max_diff(compiled(x), expected) <= 1e-5


def test_foreign_wrapper_takes_the_gathered_path(always_fast, spy):
    """A wrapper around a projection without a padded product (`batched`) sees its own call."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x, indices, sorted_indices=False, lhs_indices=None):
            return self.inner(x, indices, sorted_indices, lhs_indices)

    glu = GatheredGLU(128, 64, 16)
    glu.eval()
    x = mx.random.normal((1, 20, 128))
    indices, weights = routing(20)
    plain = experts_call(glu, PLAIN)(x, indices, weights)
    assert experts_call(glu).kernel(indices.size, x.dtype) == "padded"
    glu.down_proj = Wrapper(glu.down_proj)
    assert glu.kernel(indices.size, x.dtype) == "gathered"
    assert max_diff(experts_call(glu)(x, indices, weights), plain) == 0.0
    assert spy == []  # not tried


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_lora_training_on_padded_experts_equals_gathered(quantized, checkpointed, always_fast, spy):
    """QLoRA's loss and every adapter gradient, padded experts against gathered, in float32;
    with gradient checkpointing the padded path also runs in the backward's recomputation."""
    model = tiny_model(quantized)
    prepare_model(model, "lora", 2, {"rank": 4})
    for name, lora_b in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):  # zero at the start: make the adapters matter
            model.update(tree_unflatten([(name, mx.random.normal(lora_b.shape) * 0.01)]))
    if checkpointed:
        checkpoint_layers(model)
    model.train()
    batch = mx.random.randint(0, 200, (2, 33))
    lengths = mx.array([[0, 33], [5, 25]])
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    (fast, _), fast_grads = loss_and_grad(model, batch, lengths)
    mx.eval(fast, fast_grads)
    assert spy and all(spy)
    spy.clear()
    with fp.using(model, PLAIN):
        (plain, _), plain_grads = loss_and_grad(model, batch, lengths)
    assert spy == []
    assert abs(fast.item() - plain.item()) <= 1e-5
    fast_grads, plain_grads = dict(tree_flatten(fast_grads)), dict(tree_flatten(plain_grads))
    assert fast_grads.keys() == plain_grads.keys() and any("experts" in k for k in fast_grads)
    for name, grad in plain_grads.items():
        scale = mx.abs(grad).max().item()
        assert scale > 0, name
        assert max_diff(fast_grads[name], grad) <= 1e-4 * scale, name


# Where each tuned layer's vjp goes: this backend's padded experts a group at a time, the Metal
# policy's gathered experts compiled, or in pieces of 16 tokens (of 66) where the call is longer.
LAYERWISE_POLICIES = {
    "padded groups": lambda: FastPaths.default(),
    "metal": lambda: FastPaths.default(on="metal"),
    "metal pieces": lambda: dataclasses.replace(
        FastPaths.default(on="metal"), gathered_piece_rows=64
    ),
}


@pytest.mark.parametrize(
    ("policy", "dropout", "loss_chunk"),
    [
        (policy, dropout, loss_chunk)
        for policy in LAYERWISE_POLICIES
        for dropout, loss_chunk in [(0.0, 512), (0.3, 512), (0.0, 5)]
    ],
)
def test_layerwise_gradients_equal_value_and_grad(
    dropout, loss_chunk, policy, always_fast, grouped, monkeypatch
):
    """The trainer's layer-at-a-time gradients are one `nn.value_and_grad`'s, in float32 to
    1e-4, dropout included: each layer's forward and recomputation draw the same masks; the loss
    in pieces of 5 positions (one piece with no scored position) gives the whole sequence's.
    Under this backend's policy the padded experts go a group at a time (their dropout masks have
    the padded rows' shape in both); under the Metal policy's (gathered experts, the graphs a Mac
    builds) each layer's vjp is compiled, or goes a piece of tokens at a time where the call is
    longer than `gathered_piece_rows` (the one graph runs the same pieces, so the same masks).
    (Padded against gathered: above.)"""
    model = tiny_model(quantized=True)
    fp.set_fast_paths(model, LAYERWISE_POLICIES[policy]())
    prepare_model(model, "lora", 2, {"rank": 4, "dropout": dropout})
    model.train()
    assert takes_layerwise(model)
    batch = mx.random.randint(0, 200, (2, 33))
    lengths = mx.array([[0, 33], [5, 25]])
    mx.random.seed(7)
    (loss, tokens), grads = layerwise_loss_and_grad(model, batch, lengths, loss_chunk)
    mx.eval(loss, grads)
    assert grouped == ([] if policy == "metal" else [True, True])
    compiled = [sorted(name for name, *_ in layer.get("_train_fns", {})) for layer in model.layers]
    assert compiled == [["forward", "vjp"] if policy == "metal" else []] * 2

    # The reference: one value_and_grad, each layer reseeded as layerwise_loss_and_grad does.
    mx.random.seed(7)
    seeds = iter(mx.random.randint(0, 2**31 - 1, (len(model.layers),)).tolist())
    layer_class = type(model.layers[0])

    def reseeded(layer, *args, **kwargs):
        mx.random.seed(next(seeds))
        return original(layer, *args, **kwargs)

    original = layer_class.__call__
    monkeypatch.setattr(layer_class, "__call__", reseeded)
    (plain, plain_tokens), plain_grads = nn.value_and_grad(model, masked_loss)(
        model, batch, lengths
    )
    assert tokens.item() == plain_tokens.item()
    assert abs(loss.item() - plain.item()) <= 1e-5
    grads, plain_grads = dict(tree_flatten(grads)), dict(tree_flatten(plain_grads))
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert max_diff(grads[name], grad) <= 1e-4 * mx.abs(grad).max().item() + 1e-7, name


@pytest.mark.parametrize("metal", [False, True])
def test_training_steps_on_padded_experts_follow_the_plain_loss_curve(metal, always_fast, grouped):
    """The trainer's step goes a layer at a time, taking the padded experts a group at a time
    (so it is not compiled), or under the Metal policy the gathered ones, and gives the plain,
    compiled one-graph step's losses, step after step."""

    def losses(policy: FastPaths) -> list[float]:
        model = tiny_model(quantized=True, seed=1)
        fp.set_fast_paths(model, policy)
        mx.random.seed(2)
        prepare_model(model, "lora", 2, {"rank": 4})
        model.train()
        step, state = training_step(model, optim.Adam(learning_rate=1e-2))
        batch = mx.random.randint(0, 200, (2, 33))
        lengths = mx.array([[0, 33], [0, 33]])
        out = []
        for _ in range(4):
            loss, _, _ = step(batch, lengths, None, True)
            mx.eval(loss, state)
            out.append(loss.item())
        return out

    fast = losses(FastPaths.default(on="metal") if metal else FastPaths.default())
    assert len(grouped) == (0 if metal else 4 * 2)  # both tuned layers, every step
    plain = losses(PLAIN)
    assert len(grouped) == (0 if metal else 4 * 2)
    assert fast[-1] < fast[0] - 0.1  # it learns
    assert np.allclose(fast, plain, rtol=0, atol=1e-4)


def test_cpu_pads_half_precision_rows_only():
    """On the CPU the float32 gathered experts are the faster ones; CUDA pads either dtype."""
    glu = experts_call(GatheredGLU(128, 64, 16), FastPaths.default(on="cpu"))
    assert glu.kernel(512, mx.bfloat16) == "padded" and glu.kernel(512, mx.float32) == "gathered"
    assert glu.kernel(32, mx.bfloat16) == "gathered"  # too few rows
    assert glu.reads_routing_counts(mx.bfloat16) and not glu.reads_routing_counts(mx.float32)
    experts_call(glu, FastPaths.default(on="cuda"))
    assert glu.kernel(512, mx.float32) == glu.kernel(512, mx.bfloat16) == "padded"


def test_fast_paths_context_restores_state():
    model = tiny_model(quantized=False)
    before = model.fast_paths
    assert before == FastPaths.default() != PLAIN

    def held() -> set[FastPaths]:
        return {model.model.fast_paths} | {layer.mlp.experts.fast_paths for layer in model.layers}

    with fp.using(model, PLAIN):
        assert held() == {PLAIN}
    assert held() == {before}


def test_padded_bf16_at_least_as_accurate_as_gathered(always_fast):
    """bf16 activations and scales: both paths against a float32 computation of the same experts."""
    mx.random.seed(5)
    glu = GatheredGLU(128, 64, 16)
    nn.quantize(glu, 32, 4)
    glu.set_dtype(mx.bfloat16)
    glu.eval()
    tokens = 50
    x = mx.random.normal((1, tokens, 128)).astype(mx.bfloat16)
    indices, weights = routing(tokens)

    def dense(p):
        w = mx.dequantize(p.weight, p.scales, p.biases, group_size=32, bits=4)
        return w.astype(mx.float32)

    w_gu, w_dn = dense(glu.gate_up_proj), dense(glu.down_proj)
    h = mx.einsum("td,tkod->tko", x[0].astype(mx.float32), w_gu[indices[0]])
    h = nn.silu(h[..., :64]) * h[..., 64:]
    ref = (mx.einsum("tki,tkoi->tko", h, w_dn[indices[0]]) * weights[0, ..., None]).sum(-2)[None]

    def rel(a):
        a = a.astype(mx.float32)
        return (mx.linalg.norm((a - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()

    fast = rel(experts_call(glu)(x, indices, weights))
    plain = rel(experts_call(glu, PLAIN)(x, indices, weights))
    assert fast <= 1e-2  # bf16 rounding
    assert fast <= plain * 1.05


def test_unquantized_experts_avoid_sorted_gather_mm_on_cuda(spy):
    """MLX 0.32.4's sorted gather_mm is broken on CUDA: unquantized experts go padded there,
    and only there (other versions: off until measured)."""
    glu = GatheredGLU(128, 64, 16)
    glu.eval()
    x = mx.random.normal((1, 20, 128))  # 80 rows: sorted, under CUDA's padded threshold
    indices, weights = routing(20)
    gathered = experts_call(glu, PLAIN)(x, indices, weights)
    assert spy == []
    broken = FastPaths.default(on="cuda", mlx_version="0.32.4")
    out = experts_call(glu, broken)(x, indices, weights)
    assert spy == [True]
    assert max_diff(out, gathered) <= 1e-5
    experts_call(glu, FastPaths.default(on="cuda", mlx_version="0.33.0"))(x, indices, weights)
    assert spy == [True]
    nn.quantize(glu, 32, 4)  # quantized experts use gather_qmm, which is fine there
    experts_call(glu, broken)(x, indices, weights)
    assert spy == [True]


def test_queries_over_a_quantized_cache_attend_dequantized_where_mlx_cannot(monkeypatch):
    """MLX 0.32.4's CUDA quantized_matmul has no kernel for quantized attention over several
    queries: there a prefill chunk over a quantized KV cache attends over its dequantized keys
    and values, with the tokens and log-probabilities (1e-4) of mlx-lm's quantized attention."""
    broken = FastPaths.default(on="cuda", mlx_version="0.32.4")
    assert broken.dequantize_kv_for_queries
    assert not FastPaths.default(on="cuda", mlx_version="0.33.0").dequantize_kv_for_queries
    assert not FastPaths.default(on="metal").dequantize_kv_for_queries
    calls = []
    original = fp.scaled_dot_product_attention

    def counted(queries, keys, values, cache, scale, mask):
        calls.append(hasattr(cache, "bits") and queries.shape[2] > 1)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask)

    monkeypatch.setattr(fp, "scaled_dot_product_attention", counted)
    model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(**FAST_PATHS_CONFIG), PLAIN)
    model.eval()
    prompt = mx.array([(5 * i + 2) % 200 for i in range(23)])
    # Quantized after the first 4-token chunk: the later chunks run over a quantized cache.
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0, prefill_step_size=4)
    plain = generation(model, prompt, PLAIN, **kv)
    assert any(calls)  # mlx-lm's quantized attention over several queries ran
    calls.clear()
    workaround = dataclasses.replace(PLAIN, dequantize_kv_for_queries=True)
    dequantized = generation(model, prompt, workaround, **kv)
    assert calls and not any(calls)
    assert dequantized[0] == plain[0]
    assert mx.abs(dequantized[1] - plain[1]).max().item() <= 1e-4


def generation(model, prompt, policy: FastPaths, steps: int = 8, **kwargs):
    """Greedy tokens and stacked log-probabilities of mlx-lm's loop under `policy`."""
    with fp.using(model, policy):
        return greedy_steps(model, prompt, steps, **kwargs)[:2]


def test_a_lone_sequence_in_a_batch_decodes_unmasked_as_alone(monkeypatch):
    """A batch's decode passes an array mask for its sequences' left padding; a lone sequence
    has none to mask, and decodes without one (CUDA's fused single-token attention takes no
    mask) to the tokens and log-probabilities (1e-4) it gets outside a batch."""
    model = tiny_model(True)
    fp.set_fast_paths(model, FastPaths.default())
    masks = []
    original = fp.scaled_dot_product_attention

    def spied(queries, keys, values, cache, scale, mask):
        if queries.shape[2] == 1:
            masks.append(mask is None)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask)

    monkeypatch.setattr(fp, "scaled_dot_product_attention", spied)
    prompts = [[(3 * i + 1) % 200 for i in range(n)] for n in (11, 6)]

    def batched(prompts: list[list[int]]) -> dict[int, tuple[list[int], list[mx.array]]]:
        batch = BatchGenerator(model, stop_tokens=[], completion_batch_size=4)
        uids = batch.insert(prompts, max_tokens=[6] * len(prompts))
        got: dict[int, tuple[list[int], list[mx.array]]] = {uid: ([], []) for uid in uids}
        while sum(len(t) for t, _ in got.values()) < 6 * len(prompts):
            for r in batch.next()[1]:
                got[r.uid][0].append(r.token)
                got[r.uid][1].append(r.logprobs)
        batch.close()
        return [got[uid] for uid in uids]

    (alone_in_batch,) = batched(prompts[:1])
    assert masks and all(masks)
    tokens, logprobs = generation(model, mx.array(prompts[0]), model.fast_paths, steps=6)
    assert alone_in_batch[0] == tokens
    assert mx.abs(mx.stack(alone_in_batch[1]) - logprobs).max().item() <= ATOL
    masks.clear()
    batched(prompts)  # unequal prompts: left padding, masked
    assert masks and not all(masks)
