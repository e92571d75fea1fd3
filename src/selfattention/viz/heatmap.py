"""A heatmap of attention weights α with token labels on both axes and each value written in its cell."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from selfattention.viz.figures import figure_format, save_figure


def plot_weights(
    weights: Tensor,
    row_tokens: Sequence[str],
    col_tokens: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "attention weights α",
    annotate: bool | None = None,
) -> None:
    """Save a heatmap of ``weights`` (T, S): rows are queries, columns are keys.

    Args:
        weights: α, ``(T, S)``.
        row_tokens: T labels for the queries; col_tokens: S labels for the keys.
        path: where the figure goes, written atomically in the format of its suffix (.png, .svg, .pdf, .jpg).
        title: the figure title.
        annotate: write each value in its cell; by default only when the matrix is at most 24 × 24.

    Raises:
        ValueError: when the labels do not match the shape of ``weights``;
            or a path whose suffix is not .png, .svg, .pdf or .jpg.
    """
    figure_format(path)  # refuse an unknown suffix before drawing
    check_labels(weights, row_tokens, col_tokens)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = weights.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * max(cols, 4), 0.8 + 0.6 * max(rows, 4)))
    image = draw_weights(ax, weights, row_tokens, col_tokens, title=title, annotate=annotate)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def check_labels(weights: Tensor, row_tokens: Sequence[str], col_tokens: Sequence[str]) -> None:
    """Raise ValueError unless ``weights`` is ``(T, S)`` with T row labels and S column labels."""
    if weights.dim() != 2 or weights.shape != (len(row_tokens), len(col_tokens)):
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not match {len(row_tokens)} query labels "
            f"and {len(col_tokens)} key labels"
        )


def draw_weights(
    ax: Any,
    weights: Tensor,
    row_tokens: Sequence[str],
    col_tokens: Sequence[str],
    *,
    title: str,
    annotate: bool | None = None,
    vmax: float | None = None,
) -> Any:
    """Draw the heatmap of ``weights (T, S)`` on matplotlib axes ``ax``; returns the image (for a colorbar).

    ``vmax`` sets the top of the colour scale (default: the largest weight), so that several heatmaps can
    share one scale.
    """
    values = weights.detach().float().cpu().numpy()
    rows, cols = values.shape
    if annotate is None:
        annotate = rows <= 24 and cols <= 24
    top = max(float(values.max()), 1e-9) if vmax is None else vmax
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=top)
    ax.set_xticks(range(cols), labels=list(col_tokens), rotation=45, ha="right")
    ax.set_yticks(range(rows), labels=list(row_tokens))
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title)
    if annotate:
        threshold = 0.6 * top
        for i in range(rows):
            for j in range(cols):
                color = "white" if values[i, j] > threshold else "black"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    return image
