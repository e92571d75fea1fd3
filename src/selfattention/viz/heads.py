"""One heatmap per attention head, side by side in one PNG, on a shared colour scale."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from torch import Tensor

from selfattention.viz.figures import figure_format, save_figure
from selfattention.viz.heatmap import check_labels, draw_weights


def plot_heads(
    weights: Tensor,
    row_tokens: Sequence[str],
    col_tokens: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "attention weights α per head",
    columns: int | None = None,
) -> None:
    """Save a grid with the heatmap of each head's weights: rows are queries, columns are keys.

    Args:
        weights: α, ``(H, T, S)`` (e.g. ``record.weights`` from :func:`selfattention.capture` for one input).
        row_tokens: T labels for the queries; col_tokens: S labels for the keys.
        path: where the figure goes, written atomically in the format of its suffix (.png, .svg, .pdf, .jpg).
        title: the figure title; each panel is titled ``head h``.
        columns: panels per row (default: up to 4).

    Raises:
        ValueError: when ``weights`` is not ``(H, T, S)`` or the labels do not match it;
            or a path whose suffix is not .png, .svg, .pdf or .jpg.
    """
    figure_format(path)  # refuse an unknown suffix before drawing
    if weights.dim() != 3 or weights.shape[0] < 1:
        raise ValueError(f"weights must be (heads, queries, keys), got shape {tuple(weights.shape)}")
    check_labels(weights[0], row_tokens, col_tokens)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, rows, cols = weights.shape
    columns = min(heads, 4) if columns is None else max(1, min(columns, heads))
    grid_rows = math.ceil(heads / columns)
    panel_w, panel_h = 0.9 + 0.6 * max(cols, 4), 0.9 + 0.5 * max(rows, 4)
    fig, axes = plt.subplots(
        grid_rows, columns, figsize=(panel_w * columns, panel_h * grid_rows + 0.4), squeeze=False, layout="constrained"
    )
    top = max(float(weights.max()), 1e-9)
    images = [
        draw_weights(ax, weights[h], row_tokens, col_tokens, title=f"head {h}", vmax=top)
        for h, ax in zip(range(heads), axes.flat, strict=False)
    ]
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
        elif h % columns:
            ax.set_ylabel("")  # the query axis is labelled once per row of panels
    fig.suptitle(title)
    fig.colorbar(images[0], ax=axes, fraction=0.03, pad=0.02)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
