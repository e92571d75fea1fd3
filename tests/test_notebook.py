"""The walk-through notebook (docs/walkthrough-notebook.ipynb): it runs, prints the worked example's numbers, and the
outputs stored in it (what the docs site shows) are the ones a fresh run prints."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def generator() -> ModuleType:
    path = ROOT / "tools" / "make_walkthrough_notebook.py"
    spec = importlib.util.spec_from_file_location("make_walkthrough_notebook", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed(notebook: nbformat.NotebookNode) -> list[str]:
    """What each code cell printed, in order; an error output fails the test."""
    texts = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.outputs:
            assert output.output_type != "error", f"{output.ename}: {output.evalue}"
            parts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def stored() -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "docs" / "walkthrough-notebook.ipynb", as_version=4)


@pytest.fixture(scope="module")
def fresh(stored: nbformat.NotebookNode, tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    notebook = copy.deepcopy(stored)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return generator().execute(notebook, tmp_path_factory.mktemp("notebook"))


@pytest.mark.slow
def test_the_notebook_prints_the_worked_example(fresh: nbformat.NotebookNode) -> None:
    text = "\n".join(printed(fresh))
    assert "tensor([0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865])" in text  # ω
    assert "tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]) sum = 1.0000" in text  # α
    assert "tensor([0.4419, 0.6515, 0.5683])" in text  # z
    assert "tensor([0.4371, 0.4371, 0.4371, 0.4371, 0.4371, 0.4371])" in text  # the widely shared mistake, explained
    assert "0.4371 = 0.1385·0.55 + 0.2379·0.87 + 0.2333·0.66" in text
    assert "False" not in text  # every comparison with the library holds


@pytest.mark.slow
def test_the_stored_outputs_are_what_the_code_prints(
    stored: nbformat.NotebookNode, fresh: nbformat.NotebookNode
) -> None:
    assert printed(stored) == printed(fresh)


def test_the_notebook_is_what_its_generator_writes(stored: nbformat.NotebookNode) -> None:
    built = generator().build()
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in built.cells]
