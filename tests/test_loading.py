"""Loading: every accepted checkpoint layout, strictness, clear errors, lazy and eager memory."""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from helpers import (
    RELEASE_FILES,
    as_mlx_lm_layout,
    build_torch_model,
    rewrite_as_release_config,
    save_checkpoint,
    vocab_size,
)
from mlx.utils import tree_flatten
from safetensors.torch import save_file

from hunyuan_mlx import HunYuanMoEV1Config, load, load_model
from hunyuan_mlx.cli.generate import main as generate_main
from hunyuan_mlx.models.quantization import ROUTER_NOTE, dequantize, has_quantized_router
from hunyuan_mlx.models.weights import sanitize

IDS = np.random.default_rng(0).integers(0, 96, (1, 24))


def reference_logits(torch_model) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.numpy()


def assert_matches(model, torch_model) -> None:
    got = np.array(model(mx.array(IDS)))
    assert np.abs(got - reference_logits(torch_model)).max() <= 1e-4


def read_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory, under their stored names."""
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    return tensors


def rewrite(path, tensors: dict[str, np.ndarray | torch.Tensor]) -> None:
    """Replace a checkpoint's weights with one safetensors file holding `tensors`."""
    for f in list(path.glob("*.safetensors")) + list(path.glob("*.index.json")):
        f.unlink()
    save_file(
        {k: torch.as_tensor(np.asarray(v)).contiguous() for k, v in tensors.items()},
        str(path / "model.safetensors"),
    )


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A private copy of the tiny sharded checkpoint, free to damage."""
    path, torch_model = tiny_checkpoint
    return shutil.copytree(path, tmp_path / "ckpt"), torch_model


def release_checkpoint(path, **config):
    """A tiny checkpoint written as the release is: its config's names and list-valued fields."""
    torch_model = build_torch_model(
        tie_word_embeddings=True,
        rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
        **config,
    )
    path = save_checkpoint(torch_model, path)
    layers = torch_model.config.num_hidden_layers
    rewrite_as_release_config(
        path,
        moe_intermediate_size=[torch_model.config.intermediate_size] * layers,
        num_shared_expert=[1] * layers,
        use_mixed_mlp_moe=True,
        use_qk_norm=True,
        use_cla=False,
        cla_share_factor=2,
    )
    return torch_model, path


def test_release_layout(tmp_path):
    """model_type "hunyuan", attention_head_dim, rope_scaling alpha, a head though tied."""
    torch_model, path = release_checkpoint(tmp_path / "release")
    tensors = read_tensors(path)  # per-expert names, as the release
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0  # must be ignored
    rewrite(path, tensors)
    assert_matches(load_model(path), torch_model)


def test_transformers_fused_expert_parameters(checkpoint):
    """transformers' in-memory names: experts.gate_up_proj (E, 2I, D), experts.down_proj."""
    path, torch_model = checkpoint
    state = torch_model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    rewrite(path, state)
    assert_matches(load_model(path), torch_model)


def test_mlx_lm_switch_mlp_layout(checkpoint):
    path, torch_model = checkpoint
    ours = dict(tree_flatten(load_model(path).parameters()))
    rewrite(path, as_mlx_lm_layout(ours))
    assert_matches(load_model(path), torch_model)


def test_mlx_lm_quantized_checkpoint_loads_with_its_quantized_router(
    tmp_path, tokenizer_dir, capsys
):
    """What mlx-lm's convert -q writes (its load, quantize and save, from a release-layout
    checkpoint): the router is quantized too. It loads as it is, with the same logits as the
    router dequantized to float32, and generate --verbose says what a quantized router costs."""
    torch_model, release = release_checkpoint(
        tmp_path / "release", vocab_size=vocab_size(tokenizer_dir)
    )
    model, config = mlx_lm.utils.load_model(release)
    model, config = mlx_lm.utils.quantize_model(model, config, group_size=32, bits=4)
    path = tmp_path / "mlx-lm-4bit"
    path.mkdir()
    mlx_lm.utils.save_model(path, model)
    mlx_lm.utils.save_config(config, path / "config.json")
    for name in RELEASE_FILES:
        shutil.copy(tokenizer_dir / name, path / name)
    router = "model.layers.0.mlp.gate.wg"
    assert {f"{router}.scales", f"{router}.biases"} <= read_tensors(path).keys()

    ours = load_model(path)
    assert has_quantized_router(ours)
    # The reference: the same checkpoint with float32 routers holding the dequantized weights.
    dequantized = tmp_path / "dequantized-router"
    shutil.copytree(path, dequantized)
    tensors = read_tensors(path)
    for layer in range(torch_model.config.num_hidden_layers):
        name = f"model.layers.{layer}.mlp.gate.wg"
        wg = mx.array(tensors.pop(f"{name}.weight"))
        scales, biases = (mx.array(tensors.pop(f"{name}.{k}")) for k in ("scales", "biases"))
        tensors[f"{name}.weight"] = np.array(
            dequantize(wg, scales, biases, config["quantization"]).astype(mx.float32)
        )
    rewrite(dequantized, tensors)
    reference = load_model(dequantized)
    assert not has_quantized_router(reference)
    np.testing.assert_allclose(
        np.array(ours(mx.array(IDS))), np.array(reference(mx.array(IDS))), atol=1e-4, rtol=0
    )

    argv = ["--model", str(path), "--prompt", "hi", "--max-tokens", "2"]
    generate_main(argv)
    assert "quantized MoE router" not in capsys.readouterr().err
    generate_main([*argv, "--verbose"])
    assert ROUTER_NOTE.format(path=path) in capsys.readouterr().err


def test_sanitize_is_idempotent(tiny_checkpoint):
    path, _ = tiny_checkpoint
    config = HunYuanMoEV1Config.from_pretrained(path)
    raw = {}
    for f in path.glob("*.safetensors"):
        raw.update(mx.load(str(f)))
    once = sanitize(raw, config)
    twice = sanitize(once, config)
    assert once.keys() == twice.keys()
    assert all(mx.array_equal(once[k], twice[k]) for k in once)


def test_missing_tensor(checkpoint):
    path, torch_model = checkpoint
    state = torch_model.state_dict()
    del state["model.layers.1.self_attn.k_proj.weight"]
    rewrite(path, state)
    with pytest.raises(
        ValueError, match=r"missing 1 tensors \(model\.layers\.1\.self_attn\.k_proj"
    ):
        load_model(path)


def test_missing_expert(checkpoint):
    path, _ = checkpoint
    tensors = read_tensors(path)
    del tensors["model.layers.0.mlp.experts.5.up_proj.weight"]
    rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(path)


def test_unexpected_tensor(checkpoint):
    path, torch_model = checkpoint
    state = dict(torch_model.state_dict())
    state["model.layers.0.mlp.extra_bias"] = torch.zeros(3)
    rewrite(path, state)
    with pytest.raises(
        ValueError, match=r"1 unexpected tensors \(model\.layers\.0\.mlp\.extra_bias"
    ):
        load_model(path)


def test_wrong_shape(checkpoint):
    path, torch_model = checkpoint
    state = dict(torch_model.state_dict())
    state["model.norm.weight"] = torch.ones(65)
    rewrite(path, state)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(65,\)"):
        load_model(path)


def test_truncated_file(checkpoint):
    path, _ = checkpoint
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=f"{shard.name} is truncated"):
        load_model(path)


def test_shard_listed_in_index_but_absent(checkpoint):
    path, _ = checkpoint
    shard = sorted(path.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is listed in"):
        load_model(path)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    HunYuanMoEV1Config(num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="No safetensors weights"):
        load_model(tmp_path)


def test_load_without_a_tokenizer_names_the_folder_and_the_files(tiny_checkpoint, monkeypatch):
    """`load` returns a tokenizer or raises, before any weight is read; `load_model` needs none."""
    path, _ = tiny_checkpoint
    assert not (path / "hy.tiktoken").exists() and not (path / "tokenizer.json").exists()
    monkeypatch.setattr("hunyuan_mlx.loading.evaluate", lambda *a: pytest.fail("weights read"))
    with pytest.raises(FileNotFoundError) as error:
        load(path)
    assert str(path) in str(error.value)
    assert "hy.tiktoken" in str(error.value) and "tokenizer.json" in str(error.value)


def test_lazy_load_reads_weights_on_first_use(tiny_checkpoint):
    path, torch_model = tiny_checkpoint
    mx.clear_cache()
    before = mx.get_active_memory()
    model = load_model(path, lazy=True)
    assert mx.get_active_memory() - before < 1024  # nothing read yet
    assert_matches(model, torch_model)


def test_eager_load_peak_memory_is_the_weights(tiny_checkpoint, tmp_path):
    """A converted checkpoint (stacked experts) loads with peak memory within 10% of its size."""
    path, _ = tiny_checkpoint
    weights = dict(tree_flatten(load_model(path).parameters()))
    size = sum(v.nbytes for v in weights.values())
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    HunYuanMoEV1Config.from_pretrained(path).save_pretrained(tmp_path)
    del weights
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_model(tmp_path)
    assert mx.get_active_memory() - before >= size
    assert mx.get_peak_memory() - before <= 1.1 * size
    del model


def test_hub_repo_id_downloads_only_what_loading_needs(tiny_checkpoint, monkeypatch):
    """A repo id goes through huggingface_hub, asking for configs, safetensors and tokenizer."""
    import huggingface_hub

    path, torch_model = tiny_checkpoint
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert_matches(load_model("tencent/Hunyuan-A13B-Instruct"), torch_model)
    [(repo_id, patterns)] = calls
    assert repo_id == "tencent/Hunyuan-A13B-Instruct"
    assert "*.safetensors" in patterns and "*.json" in patterns
    assert not any(p.endswith((".bin", ".pt", ".py")) or p == "*" for p in patterns)


def test_mistyped_relative_path_says_no_such_folder(monkeypatch):
    """`work/small` looks like a Hub repo id too: the error says it is neither."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the Hub.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    message = r"No local folder work/small \(from .*\), and as a Hub repo id work/small could not"
    with pytest.raises(FileNotFoundError, match=message) as error:
        load_model("work/small")
    assert "\n" not in str(error.value)  # one line on the command line


def test_cpu_loads_in_float32_unless_told_to_keep_the_checkpoint_dtype(tiny_checkpoint, tmp_path):
    """bfloat16 is MLX's slow path on the CPU backend (benchmarks/cpu_dtype.py): "auto" casts
    scales, biases and norms to float32 there; packed weights and the router stay as they are."""
    from hunyuan_mlx.converter import convert

    path, _ = tiny_checkpoint
    convert(path, tmp_path / "q", quantize=True, q_group_size=32, dtype="bfloat16")
    dtypes = {
        d: dict(tree_flatten(load_model(tmp_path / "q", dtype=d).parameters()))
        for d in ("auto", "checkpoint", "float16")
    }
    scales = "model.layers.0.self_attn.q_proj.scales"
    norm, router = "model.norm.weight", "model.layers.0.mlp.gate.wg.weight"
    packed = "model.layers.0.mlp.experts.down_proj.weight"
    expected_auto = mx.float32 if mx.default_device().type == mx.DeviceType.cpu else mx.bfloat16
    assert dtypes["auto"][scales].dtype == dtypes["auto"][norm].dtype == expected_auto
    assert dtypes["checkpoint"][scales].dtype == dtypes["checkpoint"][norm].dtype == mx.bfloat16
    assert dtypes["float16"][scales].dtype == mx.float16
    for params in dtypes.values():
        assert params[router].dtype == mx.float32 and params[packed].dtype == mx.uint32
    with pytest.raises(ValueError, match="Unknown dtype 'bf16'"):
        load_model(tmp_path / "q", dtype="bf16")
