"""plot_heads: one panel per head in one PNG, written atomically, with clear errors for bad shapes."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch

from selfattention import capture_projections
from selfattention.examples import TOKENS, embeddings
from selfattention.viz.heads import plot_heads


def test_writes_one_png_with_a_panel_per_head(tmp_path):
    record = capture_projections(embeddings(), 8, num_heads=4, causal=True)
    one, four = tmp_path / "one.png", tmp_path / "four.png"
    plot_heads(record.weights[:1], TOKENS, TOKENS, one)
    plot_heads(record.weights, TOKENS, TOKENS, four)
    assert four.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # four panels in a row: the picture is several times as wide as one panel
    assert matplotlib.image.imread(four).shape[1] > 2.5 * matplotlib.image.imread(one).shape[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four.png", "one.png"]  # no temporary files left


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (torch.rand(6, 6), r"must be \(heads, queries, keys\), got shape \(6, 6\)"),
        (torch.rand(2, 5, 6), r"weights of shape \(5, 6\) do not match 6 query labels and 6 key labels"),
    ],
)
def test_bad_shapes_name_the_values(tmp_path, weights, message):
    with pytest.raises(ValueError, match=message):
        plot_heads(weights, TOKENS, TOKENS, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        plot_heads(torch.rand(2, 6, 6), TOKENS, TOKENS, tmp_path / "no" / "x.png")
