"""HunYuanMoEV1Config reads the three config.json kinds and rejects invalid values by name."""

from __future__ import annotations

import json

import pytest
from helpers import shared_dir

from hunyuan_mlx import HunYuanMoEV1Config

TRANSFORMERS_FIELDS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
    "num_key_value_heads hidden_act max_position_embeddings initializer_range rms_norm_eps "
    "use_cache pad_token_id bos_token_id eos_token_id eod_token_id sep_token_id pretraining_tp "
    "tie_word_embeddings attention_bias attention_dropout num_experts moe_topk"
).split()


def test_defaults_are_transformers_defaults():
    import transformers

    theirs, ours = transformers.HunYuanMoEV1Config(), HunYuanMoEV1Config()
    for name in TRANSFORMERS_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rope_scaling is None and theirs.rope_parameters["rope_type"] == "default"
    assert ours.head_dim == 4096 // 32


def test_release_config():
    config = HunYuanMoEV1Config.from_pretrained(shared_dir())
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (32, 4096, 128167)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert [config.layer_num_experts(i) for i in (0, 31)] == [64, 64]
    assert [config.layer_moe_topk(i) for i in (0, 31)] == [8, 8]
    assert config.layer_moe_intermediate_size(5) == 3072
    assert config.layer_num_shared_expert(5) == 1
    # NTK-alpha; the keys it does not use are kept, as transformers requires some of them.
    assert config.rope_scaling == {
        "type": "dynamic",
        "alpha": 1000.0,
        **{"beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    }
    assert config.tie_word_embeddings and config.use_qk_norm and config.norm_topk_prob
    assert not config.use_cla
    assert config.extra["vit_patch"] == 1  # unknown keys are kept
    assert "attention_head_dim" not in config.to_dict()  # read once, as head_dim


def test_transformers_save_config(tmp_path):
    import transformers

    transformers.HunYuanMoEV1Config(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        rope_scaling={"type": "linear", "factor": 4.0},
        rope_theta=5000.0,
        num_experts=4,
        moe_topk=[2, 1],
        num_hidden_layers=2,
    ).save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    config = HunYuanMoEV1Config.from_pretrained(tmp_path)
    assert config.rope_theta == 5000.0
    assert config.rope_scaling == {"type": "linear", "factor": 4.0}
    assert config.moe_topk == [2, 1] and config.head_dim == 16


def test_own_config_round_trips(tmp_path):
    config = HunYuanMoEV1Config(
        hidden_size=64,
        num_attention_heads=4,
        num_experts=[4, 8],
        moe_topk=2,
        num_hidden_layers=2,
        rope_scaling={"type": "dynamic", "alpha": 10.0},
        quantization={"group_size": 64, "bits": 4, "mode": "affine"},
        extra={"custom_key": [1, 2]},
    )
    config.save_pretrained(tmp_path)
    assert HunYuanMoEV1Config.from_pretrained(tmp_path) == config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(num_experts=4, moe_topk=5), "moe_topk"),
        (dict(num_hidden_layers=2, moe_topk=[1, 1, 1]), "moe_topk"),
        (dict(num_hidden_layers=2, num_experts=[4]), "num_experts"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"type": "linear"}), "factor"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(moe_intermediate_size=[64, 0], num_hidden_layers=2), "moe_intermediate_size"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        HunYuanMoEV1Config(**overrides)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HunYuanMoEV1Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        HunYuanMoEV1Config.from_pretrained(tmp_path)
