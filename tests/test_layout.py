"""The package's import graph: no cycles, the model importing nothing above it, and the
commands (thin mains) importing library code only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hunyuan_mlx"
MAINS = {"convert", "generate", "chat", "lora", "fuse", "server", "evaluate"}


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
        for target in graph[f"hunyuan_mlx.{main}"]:
            assert target.removeprefix("hunyuan_mlx.") not in MAINS, f"{main} imports {target}"
