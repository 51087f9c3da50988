"""The probe picks the experts' kernel by measurement, caches its thresholds per device, and a
broken cache never stops a run; either choice gives the same logits."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import pytest
from helpers import FAST_PATHS_CONFIG

from hunyuan_mlx.cli import tune as tune_command
from hunyuan_mlx.models import (
    FastPaths,
    HunYuanMoEV1Config,
    HunYuanMoEV1ForCausalLM,
    probe,
    thresholds,
)
from hunyuan_mlx.models.fast_paths import set_fast_paths
from hunyuan_mlx.models.probe import ms_per_token
from hunyuan_mlx.models.quantization import apply_quantization

TINY = ["--experts", "8", "--hidden", "64", "--intermediate", "64", "--group-size", "32"]
TINY += ["--decode-layers", "3", "--decode-hidden", "64", "--decode-intermediate", "64"]
TINY += ["--decode-vocab", "256"]
KEY = thresholds.key(mx.float32, 4, 32)
EVERY_KEY = thresholds.key(mx.float32, 4, 32, "every expert")


def test_choose_takes_the_first_row_count_from_which_padded_never_loses():
    assert probe.choose([(16, 1.0, 2.0), (32, 2.0, 1.9), (64, 3.0, 1.0)]) == 32
    assert probe.choose([(16, 1.0, 0.5), (32, 1.0, 2.0), (64, 3.0, 1.0)]) == 64  # lost between
    assert probe.choose([(16, 1.0, 2.0), (32, 1.0, 2.0)]) is None
    assert probe.choose([(16, 2.0, 1.0), (32, 2.0, 1.0)]) == 16


def test_tune_measures_caches_and_default_uses_it(fast_path_cache, capsys, monkeypatch):
    assert FastPaths.default().source == "built-in" and not fast_path_cache.exists()
    decode_steps = []  # (the policy's decode graph, whether the model built one) per timing

    def spied(model, prompt):
        ms = ms_per_token(model, prompt)
        graphs = model.model._decode_graphs
        decode_steps.append((model.fast_paths.decode_graph, graphs is not None))
        return ms

    monkeypatch.setattr(probe, "ms_per_token", spied)
    tune_command.main([*TINY, "--dtype", "float32"])
    out = capsys.readouterr().out
    assert KEY in out and EVERY_KEY in out and str(fast_path_cache) in out
    assert "ms, padded" in out and "ms, every expert" in out  # each probe's timings
    assert "ms, one graph" in out  # and decode's
    # Decode was timed both ways, interleaved, and the graph's rounds ran the graph.
    assert decode_steps == [(False, False), (True, True)] * probe.DECODE_ROUNDS
    cached = thresholds.cached()
    assert set(cached) == {KEY, EVERY_KEY, thresholds.DECODE_GRAPH}
    assert [thresholds.kernel_of(k) for k in (KEY, EVERY_KEY)] == ["padded", "every expert"]
    policy = FastPaths.default()
    graph = cached.pop(thresholds.DECODE_GRAPH)
    assert policy.source == "measured here" and dict(policy.measured_min_rows) == cached
    assert policy.decode_graph == (graph is not None)
    assert FastPaths.default(on="cpu").source == "forced"  # a named backend: built-in
    assert FastPaths.default(on="cpu").measured_min_rows == ()
    # The experts read the threshold of their own dtype and quantization.
    forced = dataclasses.replace(policy, measured_min_rows=((KEY, 7), (EVERY_KEY, 9)))
    assert forced.padded_from(mx.float32, 4, 32) == 7
    assert forced.padded_from(mx.float32, 3, 32) == policy.padded_from(mx.float32, 3, 32)
    assert forced.every_expert_rows(mx.float32, 4, 32) == 9
    assert forced.every_expert_rows(mx.float32, 3, 32) == policy.every_expert_from


@pytest.mark.parametrize(("choice", "graph"), [(1, True), (None, False)])
def test_decode_takes_the_step_measured_faster_here(fast_path_cache, choice, graph):
    assert not FastPaths.default().decode_graph  # built in: a layer at a time on the CPU
    thresholds.store({thresholds.DECODE_GRAPH: choice})
    policy = FastPaths.default()
    assert policy.decode_graph == graph and policy.source == "measured here"
    assert policy.measured_min_rows == ()  # not an experts' threshold
    assert ("decode as one graph" in policy.describe()) == graph
    assert not FastPaths.default(on="cpu").decode_graph  # a named backend: built-in


@pytest.mark.parametrize("content", ["{not json", '{"x": {"y": "many"}}', "[1, 2]", b"\xff\xfe"])
def test_a_corrupt_cache_falls_back_and_is_replaced(content, fast_path_cache, capsys):
    fast_path_cache.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        fast_path_cache.write_bytes(content)
    else:
        fast_path_cache.write_text(content)
    policy = FastPaths.default()
    assert policy.source == "built-in" and policy.measured_min_rows == ()
    assert "built-in thresholds" in capsys.readouterr().err
    thresholds.store({KEY: 12})
    assert thresholds.cached() == {KEY: 12}


def test_an_unwritable_cache_never_stops_a_run(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # its "folder" is a file
    assert thresholds.store({KEY: 12}) is None
    assert "cannot write" in capsys.readouterr().err
    assert FastPaths.default().source == "built-in"
    assert list(tmp_path.iterdir()) == [blocker]  # nothing half-written


@pytest.mark.parametrize(("key", "kernel"), [(KEY, "padded"), (EVERY_KEY, "every expert")])
def test_both_choices_give_equal_logits(key, kernel):
    """A measured threshold of 1 row (the kernel everywhere) and none (gathered), for the padded
    kernel and for every expert on every token: the same logits in float32, whichever the probe
    picks."""
    mx.random.seed(0)
    model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(**FAST_PATHS_CONFIG))
    apply_quantization(model, {"group_size": 32, "bits": 4})
    model.eval()
    tokens = mx.random.randint(0, 200, (1, 40))
    base = FastPaths.default(on="metal")
    logits = []
    for rows in (1, None):
        set_fast_paths(model, dataclasses.replace(base, measured_min_rows=((key, rows),)))
        kernels = {layer.mlp.experts.kernel(40 * 4, mx.float32) for layer in model.layers}
        assert kernels == {kernel if rows else "gathered"}
        logits.append(model(tokens))
    assert mx.abs(logits[0] - logits[1]).max().item() <= 1e-4


@pytest.mark.parametrize("flag", ["--experts", "--decode-layers"])
def test_a_probe_shape_below_one_is_refused_naming_its_flag(flag, fast_path_cache, capsys):
    with pytest.raises(SystemExit) as exit_:
        tune_command.main([flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a positive integer, got '0'" in capsys.readouterr().err
    assert not fast_path_cache.exists()


def test_the_cpu_probes_what_a_cpu_run_computes_in_at_a_width_it_can_time():
    """float32 rows (a CPU load's dtype; bfloat16 there took over 10 minutes) and a quarter of
    A13B's widths; a GPU probes bfloat16 and A13B's experts themselves."""
    args = tune_command.build_parser().parse_args([])
    assert args.dtype == ["float32"] and (args.hidden, args.intermediate) == (1024, 768)
    assert (probe.ProbeShape().hidden, probe.ProbeShape().intermediate) == (4096, 3072)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bits", "9"], "--bits 9 --group-size 64: MLX cannot quantize"),
        (["--group-size", "48"], "--bits 4 --group-size 48: MLX cannot quantize"),
        (
            ["--group-size", "128", "--hidden", "64"],
            "--hidden 64 is not a multiple of --group-size",
        ),
    ],
)
def test_a_quantization_mlx_cannot_probe_is_refused_naming_its_flags(
    flags, message, fast_path_cache, capsys
):
    """Refused before probing (it failed after the device line with MLX's words alone)."""
    with pytest.raises(SystemExit) as exit_:
        tune_command.main(flags)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""
    assert not fast_path_cache.exists()
