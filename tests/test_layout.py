"""The import arrows point one way: the layout that docs/layout.md describes, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "selfattention"

# What each lower layer may not import (a module or any module below it).
FORBIDDEN = {
    "backends": ("selfattention.functional", "selfattention.modules", "selfattention.models", "selfattention.cli"),
    "steps.py": ("selfattention.functional", "selfattention.backends", "selfattention.modules"),
    "checks.py": ("selfattention.functional", "selfattention.backends", "selfattention.steps"),
    "masks.py": ("selfattention.functional", "selfattention.backends", "selfattention.steps", "selfattention.checks"),
}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, inside_a_function)`` for every ``selfattention`` import in ``path``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("selfattention"):
                names = [f"{child.module}.{alias.name}" for alias in child.names]
                found.extend((name, in_function) for name in [child.module, *names])
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("selfattention"))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def _files(where: str) -> list[Path]:
    path = SRC / where
    return sorted(path.glob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(where: str) -> None:
    for path in _files(where):
        bad = [name for name, _ in _imports(path) if name.startswith(FORBIDDEN[where])]
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


@pytest.mark.parametrize("where", ["functional.py", "steps.py", "checks.py", "masks.py", "backends", "distributed.py"])
def test_the_math_imports_its_own_package_at_module_level(where: str) -> None:
    # An import inside a function is how a cycle hides; the math layers have none.
    for path in _files(where):
        inner = [name for name, in_function in _imports(path) if in_function]
        assert not inner, f"{path.relative_to(SRC)} imports {inner} inside a function"
