"""Generation API and CLI on a tiny random checkpoint carrying the release's tokenizer files."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from hunyuan_mlx.cli.generate import build_parser, main
from hunyuan_mlx.cli.options import settings_from_args
from hunyuan_mlx.generation.display import DIM, RESET, ThinkingPrinter
from hunyuan_mlx.generation.settings import GenerationSettings
from hunyuan_mlx.generation.stream import build_prompt, generate, stream_generate

ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationSettings(max_tokens=12)
PROG_ERROR = "python -m hunyuan_mlx.generate: error: "


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the generate CLI run in this process."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_runs_repeat_and_stream_the_final_text(loaded):
    model, tok = loaded
    ids = build_prompt(tok, "Tell me about MLX.")
    responses = list(stream_generate(model, tok, ids, GREEDY))
    text = "".join(r.text for r in responses)
    assert text and text == generate(model, tok, ids, GREEDY)
    assert text == tok.decode([r.token for r in responses])
    last = responses[-1]
    assert (last.finish_reason, last.generation_tokens) == ("length", GREEDY.max_tokens)
    assert last.prompt_tokens == len(ids)


def test_max_tokens_respected(loaded):
    model, tok = loaded
    responses = list(stream_generate(model, tok, "Hello", GenerationSettings(max_tokens=3)))
    assert len(responses) == 3 and responses[-1].generation_tokens == 3


def test_seed_repeats_a_sampled_run(loaded):
    model, tok = loaded
    sampled = GenerationSettings(max_tokens=8, temp=1.0)
    runs = []
    for seed in (1, 1, 2):
        mx.random.seed(seed)
        runs.append(generate(model, tok, "Hello", sampled))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stops_at_release_eos(loaded):
    """The model is made to emit <|eos|> as its third token: generation ends there, unshown."""
    model, tok = loaded
    eos = tok.convert_tokens_to_ids("<|eos|>")
    steps = []

    def eos_on_third(tokens: mx.array, logits: mx.array) -> mx.array:
        steps.append(None)
        return logits + 1e4 * (mx.arange(logits.shape[-1]) == eos) if len(steps) == 3 else logits

    responses = list(stream_generate(model, tok, "Hello", GREEDY, logits_processors=[eos_on_third]))
    assert [r.token for r in responses][-1] == eos and len(responses) == 3
    assert responses[-1].finish_reason == "stop"
    text = "".join(r.text for r in responses)
    assert "<|eos|>" not in text and text == tok.decode([r.token for r in responses[:2]])


def test_eos_option_replaces_stop_ids(loaded):
    model, tok = loaded
    tokens = [r.token for r in stream_generate(model, tok, "Hello", GREEDY)]
    k = next(i for i, t in enumerate(tokens) if i and t not in tokens[:i])
    responses = list(stream_generate(model, tok, "Hello", GREEDY, eos_token_ids=[tokens[k]]))
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == tok.decode(tokens[:k])


def test_kv_cache_options(loaded):
    model, tok = loaded
    quantized = GenerationSettings(max_tokens=6, kv_bits=4, kv_group_size=32, quantized_kv_start=0)
    assert len(list(stream_generate(model, tok, "Hello", quantized))) == 6
    rotating = GenerationSettings(max_tokens=20, max_kv_size=8)
    assert len(list(stream_generate(model, tok, "Hello", rotating))) == 20


def test_sampling_defaults_come_from_the_checkpoint(tiny_release, tmp_path):
    args = build_parser().parse_args(["--model", "m", "--prompt", "p", "--top-k", "5"])
    settings = settings_from_args(args, tiny_release)
    assert (settings.temp, settings.top_p, settings.top_k) == (0.7, 0.8, 5)
    assert settings.repetition_penalty == 1.05
    assert GenerationSettings.from_checkpoint(tmp_path).temp == 0.0
    # transformers samples only with do_sample true, whatever the temperature says.
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7, "top_k": 20}')
    assert GenerationSettings.from_checkpoint(tmp_path).temp == 0.0


def test_cli_prints_the_api_text(loaded, tiny_release, capsys, monkeypatch):
    """The CLI streams exactly the API's text, with the checkpoint's sampling defaults under the
    flags given, and no ANSI codes when stdout is not a terminal."""
    model, tok = loaded
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there"))
    argv = ["--model", str(tiny_release), "-p", "-", "--no-think", "--temp", "0", "-m", "12"]
    code, out, _ = run_main(argv, capsys)
    settings = GenerationSettings.from_checkpoint(tiny_release, temp=0, max_tokens=12)
    ids = build_prompt(tok, "Hi there", enable_thinking=False)
    assert code == 0 and out == generate(model, tok, ids, settings) + "\n"


def test_cli_missing_model_is_one_line(tmp_path):
    """The real entry point (a subprocess: it pays seconds of imports) fails in one line."""
    cmd = [sys.executable, "-m", "hunyuan_mlx.generate", "--model", str(tmp_path / "nope")]
    result = subprocess.run(cmd + ["-p", "Hi"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(PROG_ERROR) and result.stderr.count("\n") == 1
    assert "does not exist" in result.stderr


def test_cli_verbose_prints_stats(loaded, tiny_release, capsys):
    code, out, err = run_main(
        ["--model", str(tiny_release), "-p", "Hi", "-m", "4", "--verbose"], capsys
    )
    assert code == 0 and out.strip()
    prompt = len(loaded[1].apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert f"Prompt: {prompt} tokens" in err and "Generation: 4 tokens" in err
    assert "Peak memory" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-p", "   "], "The prompt is empty"),
        (["-p", "word " * 300], "more than 256 (the model's max_position_embeddings)"),
        (["-p", "Hi there, how are you?", "--max-kv-size", "4"], "more than 4 (max_kv_size)"),
        (["-p", "Hi", "--temp", "-1"], "temp must be >= 0"),
        (["-p", "Hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["-p", "Hi", "--top-k", "-3"], "top_k must be >= 0"),
        (["-p", "Hi", "--kv-bits", "7"], "kv_bits must be one of"),
        (
            ["-p", "Hi", "--kv-bits", "4", "--kv-group-size", "64"],
            "kv_group_size 64 does not divide the model's head_dim 32; it takes one of [32]",
        ),
        (["-p", "Hi", "--max-tokens", "0"], "max_tokens must be > 0"),
        (["-p", "Hi", "--ignore-chat-template", "--no-think"], "needs the chat template"),
        (["-p", "Hi", "--adapter-path", "/nonexistent"], "No adapter_config.json"),
    ],
)
def test_cli_errors_are_one_line(tiny_release, capsys, flags, message):
    code, out, err = run_main(["--model", str(tiny_release), *flags], capsys)
    assert code == 1 and out == ""
    assert err.startswith(PROG_ERROR) and message in err and err.count("\n") == 1


def test_cli_empty_stdin_and_weightless_directory(tmp_path, tiny_release, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(" \n"))
    code, _, err = run_main(["--model", str(tiny_release), "-p", "-"], capsys)
    assert code == 1 and "The prompt is empty" in err
    shutil.copyfile(tiny_release / "config.json", tmp_path / "config.json")
    code, _, err = run_main(["--model", str(tmp_path), "-p", "Hi"], capsys)
    assert code == 1 and err == f"{PROG_ERROR}No safetensors weights in {tmp_path}\n"


REPLY = "<think>\nLet me see.\n</think>\n<answer>\nHello!\n</answer>"


@pytest.mark.parametrize("cut", [1, 3, 8])
def test_thinking_printer_dims_or_hides_reasoning(cut):
    chunks = [REPLY[i : i + cut] for i in range(0, len(REPLY), cut)]
    shown = {}
    for mode in ("plain", "dim", "hide"):
        out = io.StringIO()
        printer = ThinkingPrinter(out, hide=mode == "hide", dim=mode == "dim")
        for chunk in chunks:
            printer.write(chunk)
        printer.finish()
        shown[mode] = out.getvalue()
    assert shown["plain"] == REPLY
    assert shown["dim"].replace(DIM, "").replace(RESET, "") == REPLY
    assert shown["dim"].startswith(DIM + "<think>") and "</think>" + RESET in shown["dim"]
    assert shown["dim"].endswith("\n<answer>\nHello!\n</answer>")
    assert shown["hide"] == "\n<answer>\nHello!\n</answer>"


def test_hidden_unfinished_reasoning_is_reported(capsys):
    out = io.StringIO()
    printer = ThinkingPrinter(out, hide=True)
    printer.write("<think>\nStill thinking")
    printer.finish()
    assert out.getvalue() == "" and "did not finish" in capsys.readouterr().err


def test_mlx_lm_habits_verbose_value_and_default_prompt(tiny_release, capsys):
    """mlx-lm's `--verbose True/False` and its default prompt ("hello") work here too."""
    base = ["--model", str(tiny_release), "-m", "3", "--temp", "0"]
    code, out, err = run_main([*base, "--verbose", "True"], capsys)
    assert code == 0 and "Generation: 3 tokens" in err
    assert run_main([*base, "--verbose", "F", "-p", "hello"], capsys) == (0, out, "")
    code, _, err = run_main([*base, "--verbose", "maybe"], capsys)
    assert code == 2 and "expected True or False" in err


def test_dtype_flag_reaches_the_loader(tiny_release, capsys, monkeypatch):
    """--dtype (default auto: float32 on the CPU backend) is what the model is loaded with."""
    import hunyuan_mlx.cli.options as options

    seen = []
    real_load = options.load

    def recording_load(*args, **kwargs):
        seen.append(kwargs["dtype"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(options, "load", recording_load)
    for flags in ([], ["--dtype", "checkpoint"]):
        assert run_main(["--model", str(tiny_release), "-m", "1", *flags], capsys)[0] == 0
    assert seen == ["auto", "checkpoint"]


def test_mlx_lm_generate_flags_match_the_python_api(loaded, tiny_release, tmp_path, capsys):
    """--extra-eos-token, --chat-template-config, --draft-model and --prompt-cache-file give
    what the Python API gives for the same request."""
    from mlx_lm.models.cache import save_prompt_cache

    from hunyuan_mlx.generation.stream import QUERY_MARK

    model, tok = loaded
    settings = GenerationSettings.from_checkpoint(tiny_release, max_tokens=6, temp=0)
    base = ["--model", str(tiny_release), "-m", "6", "--temp", "0", "-p", "Hi"]
    plain = generate(model, tok, build_prompt(tok, "Hi"), settings)
    third = list(stream_generate(model, tok, build_prompt(tok, "Hi"), settings))[2]
    stop = [*tok.eos_token_ids, third.token]
    expected = generate(model, tok, build_prompt(tok, "Hi"), settings, eos_token_ids=stop)
    assert len(expected) < len(plain)
    token = tok.decode([third.token])
    assert run_main([*base, "--extra-eos-token", token], capsys)[:2] == (0, expected + "\n")

    no_think = generate(model, tok, build_prompt(tok, "Hi", enable_thinking=False), settings)
    config = ["--chat-template-config", '{"enable_thinking": false}']
    assert run_main([*base, *config], capsys)[:2] == (0, no_think + "\n")

    # The same checkpoint as its own draft: speculative decoding keeps the greedy text.
    assert run_main([*base, "--draft-model", str(tiny_release)], capsys)[:2] == (0, plain + "\n")

    # A cache holding the template's text before the user's, as mlx-lm's cache_prompt saves it.
    text = tok.apply_chat_template([{"role": "user", "content": QUERY_MARK}], tokenize=False)
    cache = model.make_cache()
    mx.eval(model(mx.array([tok.encode(text[: text.index(QUERY_MARK)])]), cache=cache))
    save_prompt_cache(str(tmp_path / "prefix.safetensors"), cache)
    cached = ["--prompt-cache-file", str(tmp_path / "prefix.safetensors")]
    assert run_main([*base, *cached], capsys)[:2] == (0, plain + "\n")

    for flags, message in [
        (["--chat-template-config", "[1]"], "--chat-template-config must be a JSON object"),
        (["--extra-eos-token", "hello world"], "is not one token of the vocabulary"),
        (["--draft-model", str(tmp_path)], "must be a HunYuan checkpoint with the same tokenizer"),
        ([*cached, "--draft-model", str(tiny_release)], "cannot be combined"),
    ]:
        code, out, err = run_main([*base, *flags], capsys)
        assert code == 1 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("name", "said"),
    [("auto", "[built-in]"), ("metal", "padded experts never [forced]"), ("off", "fast paths off")],
)
def test_fast_paths_flag_and_verbose_say_the_policy(tiny_release, capsys, name, said):
    """--fast-paths picks the model's policy; --verbose says which and where its thresholds
    came from (no cache here: built-in)."""
    flags = ["--model", str(tiny_release), "-p", "Hi", "-m", "2", "--verbose"]
    code, _, err = run_main([*flags, "--fast-paths", name], capsys)
    assert code == 0 and "Fast paths: " in err and said in err


def test_load_takes_a_policy(tiny_release):
    from hunyuan_mlx import load
    from hunyuan_mlx.models import FastPaths

    model, _ = load(tiny_release, lazy=True, fast_paths="metal")
    assert model.fast_paths == FastPaths.default(on="metal")
    assert {layer.mlp.experts.fast_paths for layer in model.layers} == {model.fast_paths}
    with pytest.raises(ValueError, match="--fast-paths must be one of"):
        load(tiny_release, lazy=True, fast_paths="gpu")
