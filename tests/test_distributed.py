"""Several ranks for real: `mlx.launch --backend ring` on localhost, tiny float32 models.

Tensor mode over 2 ranks and pipeline mode over 3 give the single-process logits (prefill and
cached decode steps, in tensor mode as the whole model's decode graph with its all_sums inside,
held to one process's per-layer steps; float32, 4-bit, mixed_8, mxfp4, a quantized KV cache,
LoRA adapters), and the CLI the same greedy text; a rank count the model cannot be split by, and
a rank missing its shard, end every rank with one line; DoRA where tensor mode cannot split it
is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from distributed_worker import case_logits
from helpers import (
    RELEASE_FILES,
    RELEASE_VOCAB_GENERATE,
    TINY_CONFIG,
    build_torch_model,
    save_checkpoint,
    serve,
    server_command,
    vocab_size,
)

from hunyuan_mlx import distributed, load_model
from hunyuan_mlx.cli.generate import main as generate_main
from hunyuan_mlx.converter import convert
from hunyuan_mlx.distributed import make_plan
from hunyuan_mlx.models import HunYuanMoEV1Config
from hunyuan_mlx.tuner.adapters import (
    ADAPTER_FILE,
    adapter_weights,
    prepare_model,
    save_adapter_config,
)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "mlx.launch"
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
# 3 layers for 3 pipeline stages; widths that 2 ranks split into whole quantization groups of 32.
DIST_CONFIG = dict(
    TINY_CONFIG, num_hidden_layers=3, head_dim=32, intermediate_size=64, num_attention_heads=4
)
LAUNCH_TIMEOUT = 300  # generous: several ranks on a loaded 2-core machine
GENERATE = "python -m hunyuan_mlx.generate: error: "
SERVER = "python -m hunyuan_mlx.server: error: "

pytestmark = pytest.mark.skipif(not LAUNCH.is_file(), reason=f"no mlx.launch at {LAUNCH}")


def ring(ranks: int) -> list[str]:
    """`mlx.launch` of `ranks` ring ranks on localhost, listening on free ports: by default every
    launch listens on 32323 and up, so two at once (two suites on one machine) join each other's
    rings and compute with the other's ranks (wrong logits, or a rank left with no model)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            start = probe.getsockname()[1]
        try:
            with contextlib.ExitStack() as ports:
                for port in range(start, start + ranks):
                    ports.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:  # one of the next ports is taken (or past 65535): draw again
            continue
        return [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--starting-port", str(start)]


def launch(ranks: int, *command: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`command` on `ranks` ranks of the ring backend on localhost, importing this checkout;
    `stdin` is the launch's input (none: an empty one)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(
        [*ring(ranks), "--", sys.executable, *command],
        input=stdin or "",
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=LAUNCH_TIMEOUT,
    )


def failure_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a launch whose ranks all stopped (mlx.launch itself exits with 0,
    and warns of each rank that failed or that it stopped)."""
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    for rank in range(2):
        assert f"Node with rank {rank} " in result.stderr, result.stderr
    return line


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """float32, 4-bit, mixed_8 and mxfp4 conversions (a layer over several shards), and LoRA
    adapters."""
    root = tmp_path_factory.mktemp("dist")
    source = save_checkpoint(build_torch_model(seed=3, **DIST_CONFIG), root / "hf")
    paths = {}
    for name, options in {
        "f32": {},
        "q4": dict(quantize=True, q_group_size=32),
        "mixed8": dict(quantize=True, q_group_size=32, quant_recipe="mixed_8"),
        "mxfp4": dict(quantize=True, q_mode="mxfp4"),  # scales only, no biases
    }.items():
        paths[name] = root / name
        convert(source, paths[name], dtype="float32", max_shard_size="60KB", **options)
    paths["adapters"] = make_adapters(paths["f32"], root / "adapters")
    return paths


def make_adapters(model_path: Path, path: Path) -> Path:
    """LoRA on every target of the last 2 layers, with non-zero random `lora_b` (trained-like)."""
    model = load_model(model_path)
    parameters = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    prepare_model(model, "lora", 2, parameters)
    mx.random.seed(5)
    weights = {
        name: mx.random.normal(w.shape) * 0.05 if name.endswith("lora_b") else w
        for name, w in adapter_weights(model).items()
    }
    save_adapter_config(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": parameters}, path
    )
    mx.save_safetensors(str(path / ADAPTER_FILE), weights)
    return path


def cases(models: dict[str, Path]) -> dict[str, dict]:
    return {
        "f32": {"model": str(models["f32"])},
        "kv8": {"model": str(models["f32"]), "kv_bits": 8},
        "q4": {"model": str(models["q4"])},
        "mixed8": {"model": str(models["mixed8"])},
        "mxfp4": {"model": str(models["mxfp4"])},
        "lora": {"model": str(models["f32"]), "adapters": str(models["adapters"])},
    }


@pytest.fixture(scope="module")
def release_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny 3-layer random model with the release's tokenizer files (for the CLI)."""
    path = tmp_path_factory.mktemp("dist_release")
    vocab = vocab_size(tokenizer_dir)
    model = build_torch_model(**RELEASE_VOCAB_GENERATE, vocab_size=vocab, num_hidden_layers=3)
    save_checkpoint(model, path)
    for name in RELEASE_FILES:
        shutil.copyfile(tokenizer_dir / name, path / name)
    return path


@pytest.mark.parametrize(("ranks", "mode"), [(2, "tensor"), (3, "pipeline")])
def test_logits_and_greedy_text_equal_the_single_process_ones(
    models, release_model, tmp_path, capsys, ranks, mode
):
    spec = cases(models)
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    out = tmp_path / "logits.npz"
    flags = ["--pipeline"] if mode == "pipeline" else []
    argv = ["--model", str(release_model), "-p", "Tell me about MLX.", "-m", "12", "--temp", "0"]
    flags += ["--generate", json.dumps(argv)]
    result = launch(ranks, str(WORKER), str(tmp_path / "cases.json"), str(out), *flags)
    # mlx.launch exits with 0 whatever its ranks do; it warns of a rank that failed.
    assert "[WARN] Node with rank" not in result.stderr, result.stderr
    got = np.load(out)
    for name, case in spec.items():
        # One process, each layer's compiled step: the ranks' decode graph is held to it.
        prefill, decode = case_logits(case, None, False, decode_graph=False)
        for part, want in (("prefill", prefill), ("decode", decode)):
            np.testing.assert_allclose(
                got[f"{name}.{part}"], want, atol=1e-4, rtol=0, err_msg=f"{mode} {name} {part}"
            )
    generate_main(argv)
    single = capsys.readouterr().out
    assert single.strip() and result.stdout == single  # printed once, by rank 0


def stop_at(text: str) -> int:
    """Where a stop string cancels a reply after a few of its tokens: the first 3 characters
    from the 7th on that `text` has not written before (a random model's text repeats itself)."""
    return next(i for i in range(6, len(text) - 3) if text.find(text[i : i + 3]) == i)


@pytest.mark.parametrize(("ranks", "flags"), [(2, []), (3, ["--pipeline"])])
def test_the_server_under_mlx_launch_answers_as_one_process(release_model, tmp_path, ranks, flags):
    """Rank 0 serves, every rank computes: the same replies as a single-process server, also
    after a request that a stop string cancels mid-generation (the ranks must stop together),
    and for clients at once, batched on every rank alike."""
    openai = pytest.importorskip("openai")
    launcher = [*ring(ranks), "--"]
    server = contextlib.contextmanager(serve)
    replies = []
    with (
        server(server_command(release_model), tmp_path / "one.log") as one,
        server(launcher + server_command(release_model, *flags), tmp_path / "ranks.log") as ranks,
    ):
        for url in (one, ranks):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

            def chat(client=client, **kwargs) -> str:
                kwargs = {"temperature": 0.0, "max_tokens": 24, **kwargs}
                messages = [{"role": "user", "content": "Tell me about MLX."}]
                reply = client.chat.completions.create(
                    model=str(release_model), messages=messages, **kwargs
                )
                return reply.choices[0].message.content

            greedy = chat()
            at = stop_at(greedy)
            cut = chat(stop=[greedy[at : at + 3]])
            again = chat()  # the prompt cache's copy, after the cancel
            sampled = chat(temperature=1.0, seed=7)
            # Clients at once: they join and leave one batch (a short one leaves it first).
            with ThreadPoolExecutor(4) as pool:
                together = list(pool.map(lambda m: chat(max_tokens=m), (24, 6, 24, 16)))
            replies.append((greedy, cut, again, sampled, together))
    (greedy, cut, again, sampled, together), launched = replies
    assert cut == greedy[: stop_at(greedy)] and again == greedy, replies
    assert together[0] == greedy and together[1] == greedy[: len(together[1])], replies
    assert launched == replies[0], replies
    assert "one request at a time" not in (tmp_path / "ranks.log").read_text()


def test_the_plans_split_what_they_say(models):
    """Each rank's share: layers in runs (the first ranks one layer more), tensors by layer."""
    config = HunYuanMoEV1Config.from_pretrained(models["f32"])

    class Group:  # what make_plan reads of a group
        def __init__(self, rank: int, size: int):
            self.rank, self.size = (lambda: rank), (lambda: size)

    stages = [make_plan(config, Group(r, 2), pipeline=True) for r in range(2)]
    assert [(p.first_layer, p.end_layer) for p in stages] == [(0, 2), (2, 3)]
    assert stages[1].keeps("model.layers.2.mlp.gate.wg.weight")
    assert not stages[1].keeps("model.layers.1.mlp.gate.wg.weight")
    assert stages[1].keeps("model.embed_tokens.weight")
    with pytest.raises(ValueError, match="3 layers, 4 ranks"):
        make_plan(config, Group(0, 4), pipeline=True)
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3.*--pipeline") as e:
        make_plan(config, Group(0, 3), pipeline=False)
    assert str(e.value).endswith("Use --pipeline (layers split over the ranks), or 2 ranks")
    one_head = HunYuanMoEV1Config(**{**DIST_CONFIG, "num_key_value_heads": 1})
    with pytest.raises(ValueError, match="1 key-value heads are not a multiple of 2") as e:
        make_plan(one_head, Group(0, 2), pipeline=False)
    assert str(e.value).endswith("Use --pipeline (layers split over the ranks)")


def test_a_rank_count_that_does_not_divide_the_heads_is_one_error_before_any_read(tmp_path):
    """One key-value head over 2 ranks; the checkpoint has no weights at all, so an error about
    them would mean they were looked at first."""
    config = HunYuanMoEV1Config(**{**DIST_CONFIG, "num_key_value_heads": 1})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    result = launch(2, "-m", "hunyuan_mlx.generate", "--model", str(tmp_path), "-p", "hi")
    line = failure_line(result)
    assert line.startswith(GENERATE) and "1 key-value heads" in line, line
    assert "2 ranks" in line and "--pipeline" in line, line


def test_a_rank_missing_its_shard_stops_every_rank_with_one_line(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["f32"], broken)
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    # A shard holding only layer 2's tensors (rank 1's), none that rank 0 needs.
    files_of_others = {f for name, f in weight_map.items() if ".layers.2." not in name}
    last_layer = sorted(set(weight_map.values()) - files_of_others)[0]
    (broken / last_layer).unlink()
    result = launch(
        2, "-m", "hunyuan_mlx.generate", "--model", str(broken), "-p", "hi", "--pipeline"
    )
    line = failure_line(result)
    # Rank 0 (layers 0-1) has what it needs; rank 1 (layer 2) names the missing file.
    assert line.startswith(f"{GENERATE}rank 1 (") and last_layer in line, line
    assert "rank 0" not in line


class TwoRanks:
    """Rank 0 of a group of 2, for `together` without a launch (its gather is replaced)."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


@pytest.mark.parametrize("error", [ValueError(), TimeoutError(), KeyError("w")])
def test_a_failed_step_is_an_error_even_without_text_or_when_its_gather_loses_it(
    monkeypatch, error
):
    """A step that raises never leaves rank 0 going on with no result (a ValueError without text
    once went through as None, to fail later as "'NoneType' object has no attribute 'model'")."""
    sent = []

    def gather(group, message):
        sent.append(message)
        return []  # as if no rank had failed: the gather lost every message

    def step():
        raise error

    monkeypatch.setattr(distributed, "gather_messages", gather)
    with pytest.raises(RuntimeError, match=f"rank 0 .*{type(error).__name__}"):
        distributed.together(TwoRanks(), step)
    assert sent[0].endswith(f"\n{distributed.error_line(error)}")
    assert distributed.error_line(ValueError()) == "ValueError"
    assert distributed.error_line(ValueError("bad flag")) == "bad flag"


def test_dora_on_a_column_split_projection_is_refused_in_tensor_mode(models):
    """DoRA's norm spans every input of o_proj: tensor mode cannot split it, and says what can."""
    model = load_model(models["f32"])
    prepare_model(model, "dora", 1, {"keys": ["self_attn.o_proj"]})

    class Rank1Of2:  # what shard_inplace reads of a group
        def rank(self) -> int:
            return 1

        def size(self) -> int:
            return 2

    with pytest.raises(ValueError, match="DoRA adapters on layer 2.s self_attn.o_proj.*--pipeline"):
        model.shard(Rank1Of2())


def test_pipeline_outside_mlx_launch_is_one_error(models, capsys):
    with pytest.raises(SystemExit):
        generate_main(["--model", str(models["f32"]), "-p", "hi", "--pipeline"])
    assert capsys.readouterr().err.strip() == (
        f"{GENERATE}--pipeline splits the layers over the ranks of mlx.launch; this is a single "
        "process"
    )


def test_a_prompt_from_stdin_is_refused_under_mlx_launch_in_one_line(models):
    """`--prompt -` under mlx.launch, which gives its ranks no stdin, waited for ever; now it is
    one error line (issue 25 item 2)."""
    command = ["-m", "hunyuan_mlx.generate", "--model", str(models["f32"]), "--prompt", "-"]
    line = failure_line(launch(2, *command, stdin="Hello there"))
    assert line.startswith(GENERATE + "--prompt - cannot read stdin under mlx.launch"), line
