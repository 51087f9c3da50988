"""A new user's first steps: the `hunyuan-mlx` command's help and version, and the quickstart's
kept checkpoint that the commands run on."""

from __future__ import annotations

import importlib
import sys

import pytest
from helpers import RELEASE_FILES, load_example, shared_dir

import hunyuan_mlx
from hunyuan_mlx import HunYuanMoEV1Config, cli
from hunyuan_mlx.cli.generate import main as generate_main
from hunyuan_mlx.distributed import tensor_problem
from hunyuan_mlx.models.quantization import DEFAULT_Q_MODE, quant_params


def dispatch(argv: list[str]) -> int:
    """The exit status of `hunyuan-mlx ARGV` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_command_usage_reads_as_the_user_typed_it(command, capsys, monkeypatch):
    """`hunyuan-mlx CMD --help` and its errors say `hunyuan-mlx CMD`; the console script
    `hunyuan-mlx-CMD` says its own name; called from Python, `python -m hunyuan_mlx.CMD`."""
    assert dispatch([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: hunyuan-mlx {command} [-h]")
    assert dispatch([command, "--no-such-flag"]) == 2
    assert f"\nhunyuan-mlx {command}: error: " in capsys.readouterr().err
    main = importlib.import_module(f"hunyuan_mlx.cli.{command}").main
    for argv0, prog in [
        (f"/venv/bin/hunyuan-mlx-{command}", f"hunyuan-mlx-{command}"),
        ("pytest", f"python -m hunyuan_mlx.{command}"),
    ]:
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit):
            main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: {prog} [-h]")


def test_version(capsys):
    cli.main(["--version"])
    assert capsys.readouterr().out == f"hunyuan-mlx {hunyuan_mlx.__version__}\n"


def test_help_lists_the_commands_and_where_their_flags_are(capsys):
    """`hunyuan-mlx --help` exits 0; no command exits 2; an unknown one is named."""
    assert dispatch(["--help"]) == 0
    shown = capsys.readouterr().err
    assert "Run `hunyuan-mlx <command> --help` for a command's flags." in shown
    assert all(f"\n  {command} " in shown for command in cli.COMMANDS)
    assert dispatch([]) == 2
    assert dispatch(["genrate"]) == 2
    assert "hunyuan-mlx: error: unknown command 'genrate'" in capsys.readouterr().err


def test_quickstart_saves_a_checkpoint_the_commands_run_on(tmp_path, capsys):
    """`quickstart.py --save DIR` keeps its random checkpoint with the release's tokenizer files,
    and `generate` runs on it as the printed hint says; an existing DIR is refused in one line."""
    shared_dir()  # the tokenizer files come from there
    quickstart = load_example("quickstart.py")
    path = tmp_path / "demo-model"
    argv = ["--save", str(path), "--layers", "2", "--hidden", "64", "--tokens", "2"]
    quickstart.main(argv)
    out = capsys.readouterr().out
    assert f"Kept the checkpoint in {path}: random weights" in out
    assert all((path / name).is_file() for name in RELEASE_FILES)
    generate_main(["--model", str(path), "--prompt", "hello", "--max-tokens", "3"])
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "already exists" in err and err.count("\n") == 1


def test_quickstart_runs_without_the_release_files(tmp_path, monkeypatch, capsys):
    """On a fresh machine without `../shared/hunyuan-a13b/` (the README's first command), the
    quickstart still writes, loads and decodes its checkpoint, on raw token ids."""
    quickstart = load_example("quickstart.py")
    monkeypatch.setattr(quickstart, "RELEASE", tmp_path / "absent")
    quickstart.main(["--layers", "2", "--hidden", "64", "--tokens", "2"])
    out = capsys.readouterr().out
    assert "(no tokenizer:" in out and "Greedy tokens" in out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_flag_says_what_it_does_and_its_default(command):
    """Issue 25 item 15: each option's help is more than its default, and names the default
    where there is one (lora's are `LoRAConfig`'s: its parser leaves them None for the YAML)."""
    import argparse
    import dataclasses

    from hunyuan_mlx.tuner.trainer import LoRAConfig

    parser = importlib.import_module(f"hunyuan_mlx.cli.{command}").build_parser()
    config_defaults = {f.name: f.default for f in dataclasses.fields(LoRAConfig)}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name, text = action.option_strings[-1], action.help or ""
        assert text and not text.startswith("default"), f"{command} {name}: {text!r}"
        default = action.default
        if command == "lora" and default is None:
            default = config_defaults.get(action.dest)
        if default not in (None, False, (), dataclasses.MISSING) and not action.required:
            assert "default" in text, f"{command} {name} does not say its default {default!r}"


@pytest.mark.parametrize("ranks", [2, 4])
def test_quickstart_model_splits_in_tensor_mode_also_at_4_bits(ranks):
    """The quickstart's checkpoint and its 4-bit conversion (the converter's default group size)
    split over 2 and 4 ranks in tensor mode: every rank gets whole heads and quantization groups."""
    quickstart = load_example("quickstart.py")
    config = quickstart.demo_config(quickstart.DEFAULT_LAYERS, quickstart.DEFAULT_HIDDEN)
    assert tensor_problem(HunYuanMoEV1Config.from_dict(config), ranks) is None
    config["quantization"] = quant_params(None, None, DEFAULT_Q_MODE)
    assert tensor_problem(HunYuanMoEV1Config.from_dict(config), ranks) is None
