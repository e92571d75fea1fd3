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


TESTS = Path(__file__).resolve().parent

# Imports of the package inside a function that are there on purpose: a heavy optional dependency
# imported only where it is used, so that importing the library stays fast (STYLE.md).
LAZY_ON_PURPOSE = {
    ("training/recipe.py", "selfattention.viz.loss_curve"),  # matplotlib, only when a loss curve is drawn
}


def test_every_subpackage_has_its_test_folder() -> None:
    packages = sorted(path.parent.name for path in SRC.glob("*/__init__.py"))
    assert "cli" in packages  # the glob found the source tree
    missing = [name for name in packages if not (TESTS / name).is_dir() or not any((TESTS / name).glob("test_*.py"))]
    assert not missing, f"src/selfattention/{missing} have no tests/<name>/ folder with tests: mirror src/"


def test_no_test_module_of_a_subpackage_is_left_flat() -> None:
    # tests/test_cli_x.py belongs in tests/cli/test_x.py, and so on for every subpackage
    prefixes = tuple(f"test_{path.parent.name}_" for path in SRC.glob("*/__init__.py"))
    flat = sorted(path.name for path in TESTS.glob("test_*.py") if path.name.startswith(prefixes))
    assert not flat, f"{flat} test a subpackage: move them into its folder under tests/"


def test_the_library_imports_its_own_package_at_module_level() -> None:
    # cli/ and viz/ may import lazily (commands and plots load what they need); the rest of the library may
    # not, except for the heavy optional imports listed above.
    inner = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        if where.startswith(("cli/", "viz/")):
            continue
        inner += [(where, name) for name, in_function in _imports(path) if in_function]
    allowed = {
        (where, name) for where, name in inner if any(where == w and name.startswith(m) for w, m in LAZY_ON_PURPOSE)
    }
    assert set(inner) - allowed == set(), f"imports inside functions: {sorted(set(inner) - allowed)}"


def test_the_layout_page_names_every_module_and_subpackage() -> None:
    page = (TESTS.parent / "docs" / "layout.md").read_text()
    names = [p.name for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")]
    names += [f"{p.parent.name}/" for p in SRC.glob("*/__init__.py")]
    missing = sorted(name for name in names if name not in page)
    assert not missing, f"docs/layout.md does not say where {missing} belong"
