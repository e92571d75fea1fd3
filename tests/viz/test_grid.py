"""``plot_grid``: the heatmap file and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfattention.viz.grid import plot_grid


def test_writes_a_png_of_the_grid(tmp_path: Path) -> None:
    path = tmp_path / "grid.png"
    plot_grid(torch.rand(3, 4), path, title="scores")
    plot_grid(torch.randn(2, 3), tmp_path / "signed.png", title="effects", column_labels=["a", "b", "c"], centered=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "signed.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("values", "labels", "message"),
    [
        (torch.rand(3), None, r"values must be \(layers, columns\), got shape \(3,\)"),
        (torch.rand(2, 3), ["a"], "1 column labels for 3 columns"),
    ],
)
def test_bad_input_is_named(tmp_path: Path, values: torch.Tensor, labels: list[str] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plot_grid(values, tmp_path / "x.png", title="t", column_labels=labels)
    with pytest.raises(ValueError, match="suffix"):
        plot_grid(torch.rand(2, 2), tmp_path / "x.gif", title="t")
    assert not (tmp_path / "x.png").exists()
