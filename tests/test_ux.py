"""A new user's first steps: the quickstart's kept checkpoint that the commands run on."""

from __future__ import annotations

import pytest
from helpers import RELEASE_FILES, load_example, shared_dir

from hunyuan_mlx.cli.generate import main as generate_main


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
