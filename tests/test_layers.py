"""The layering contract (ARCHITECTURE.md) holds: import-linter's layers contract on the
installed layout, imports of the project's own modules at module top, no cycle between
subpackages, a small ``adapter/`` top level and no product file over 600 lines."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"adapter": "adapter", "passes": "adapter.passes", "backends": "adapter.backends",
           "kernels": "adapter.kernels", "op_library": "adapter.op_library", "profiles": "adapter.profiles"}  # fmt: skip
"""Each top-level folder and the package it installs as (setup.py's package_dir)."""
MAX_LINES = 600
MAX_TOP_MODULES = 8
MAX_INNER_SHARE = 0.05


def _modules() -> dict[str, Path]:
    """Every product module by its installed name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _own_imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for each import of adapter's own modules."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                if base.split(".")[0] == "adapter":
                    found.append((base, inner, child.lineno))
            elif isinstance(child, ast.Import):
                found.extend((a.name, inner, child.lineno) for a in child.names if a.name.split(".")[0] == "adapter")
            visit(child, inner)

    visit(tree, False)
    return found


def _subpackage(module: str) -> str:
    """``adapter.converter.build`` -> ``adapter.converter``; top-level modules are their own unit."""
    return ".".join(module.split(".")[:2])


def _layout(tmp_path: Path) -> Path:
    """The installed layout (folders mapped into the adapter namespace) with the contract:
    import-linter reads packages from disk, so it must see adapter.passes, adapter.backends, ..."""
    tree = tmp_path / "layout"
    shutil.copytree(ROOT / "adapter", tree / "adapter", ignore=shutil.ignore_patterns("__pycache__", "data"))
    for folder in FOLDERS:
        if folder != "adapter":
            shutil.copytree(ROOT / folder, tree / "adapter" / folder, ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _lint(tree: Path) -> subprocess.CompletedProcess:
    if shutil.which("lint-imports") is None:
        pytest.fail("import-linter is not installed: tools/install-test-deps.sh installs the [dev] extra")
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(tree)}
    return subprocess.run(["lint-imports", "--no-cache"], cwd=tree, capture_output=True, text=True, env=env)


def test_lint_imports_keeps_the_layers(tmp_path):
    result = _lint(_layout(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_the_contract_would_catch_an_upward_import(tmp_path):
    """The same run fails when core or passes import the convert layer (the check can fail)."""
    tree = _layout(tmp_path)
    errors = tree / "adapter" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom adapter.converter import api  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "adapter.core is not allowed to import adapter.converter" in result.stdout
    # the folders installed as adapter.<name> are optional layers (absent from a plain checkout's
    # adapter/): in the installed layout they exist and are checked
    base = tree / "adapter" / "passes" / "base.py"
    base.write_text(base.read_text() + "\nfrom adapter.converter import api  # noqa\n")
    result = _lint(tree)
    assert "adapter.passes is not allowed to import adapter.converter" in result.stdout


def test_own_imports_sit_at_module_top():
    imports = [(m, *i) for m, p in _modules().items() for i in _own_imports(m, p)]
    inner = [f"{m}:{line} -> {target}" for m, target, nested, line in imports if nested]
    assert len(imports) > 200
    assert len(inner) / len(imports) <= MAX_INNER_SHARE, inner


def test_lazy_commands_stay_inside_the_cli_layer():
    """The CLI loads each command's module when it runs (so generating imports no torch); the
    modules it names by string are cli modules, whose own imports lint-imports checks."""
    import click

    from adapter.cli.main import COMMANDS, cli

    modules = {target.split(":")[0] for target in COMMANDS.values()}
    assert all(m.startswith("adapter.cli.") for m in modules), modules
    assert modules <= set(_modules()), modules - set(_modules())
    for name in COMMANDS:
        assert isinstance(cli.get_command(click.Context(cli), name), click.Command), name


def test_no_cycle_between_subpackages():
    edges: dict[str, set[str]] = {}
    for module, path in _modules().items():
        for target, _nested, _line in _own_imports(module, path):
            a, b = _subpackage(module), _subpackage(target)
            if a != b and b != "adapter":
                edges.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(nxt):], nxt]) if nxt in trail else nxt)
            if nxt not in state:
                walk(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    assert {"adapter.core", "adapter.converter", "adapter.cli"} <= set(edges) | {"adapter.core"}


def test_adapter_top_level_is_small_and_files_are_short():
    top = sorted(p.name for p in (ROOT / "adapter").glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
