"""The package's import graph: no cycles, the model independent of everything built on it, the
commands (`cli/`) importing library code only and imported by no library module, and the
`python -m hunyuan_mlx.<command>` entry modules imported by nothing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hunyuan_mlx"
MAINS = {"convert", "generate", "chat", "lora", "fuse", "server", "evaluate", "tune"}
# `python -m hunyuan_mlx.<command>` and `python -m hunyuan_mlx <command>`.
ENTRY_MODULES = {f"hunyuan_mlx.{main}" for main in MAINS}
MAIN_MODULES = {*ENTRY_MODULES, "hunyuan_mlx.__main__"}


def in_cli(name: str) -> bool:
    return name == "hunyuan_mlx.cli" or name.startswith("hunyuan_mlx.cli.")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of its code)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                # `from . import x` imports the submodule x; `from .m import y` the module m.
                submodules = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in modules] or [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_cycles():
    graph = imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import cycle: " + " -> ".join([*path, name])
        if name in done:
            return
        for target in graph[name]:
            # A package's __init__ importing its own submodules is how packages export names.
            if not target.startswith(name + "."):
                visit(target, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_models_import_nothing_above_them():
    for name, targets in imports().items():
        if name.startswith("hunyuan_mlx.models"):
            for target in targets:
                assert target.startswith("hunyuan_mlx.models"), f"{name} imports {target}"


def test_commands_import_library_code_only():
    graph = imports()
    for main in MAINS:
        for target in graph[f"hunyuan_mlx.cli.{main}"]:
            assert target.removeprefix("hunyuan_mlx.cli.") not in MAINS, f"{main} imports {target}"


def test_only_cli_imports_cli():
    """Library modules never import the commands or their flags: the layering points down."""
    for name, targets in imports().items():
        if not in_cli(name) and name not in MAIN_MODULES:
            for target in targets:
                assert not in_cli(target), f"{name} imports {target}"


def test_entry_modules_are_imported_by_nothing():
    """Importing `hunyuan_mlx.convert` the module would rebind the package's `convert`, the
    converter function; the entry modules exist only for `python -m`, and only name `main`."""
    graph = imports()
    for name, targets in graph.items():
        assert not targets & ENTRY_MODULES, f"{name} imports {targets & ENTRY_MODULES}"
    for entry in ENTRY_MODULES:
        assert graph[entry] == {entry.replace("hunyuan_mlx.", "hunyuan_mlx.cli.")}
