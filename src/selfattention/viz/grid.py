"""A heatmap of one number per cell of a grid: per layer and head (detector scores, patching effects) or per
layer and position (residual patching)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor

from selfattention.viz.figures import figure_format, save_figure


def plot_grid(
    values: Tensor,
    path: str | os.PathLike[str],
    *,
    title: str,
    column_labels: Sequence[str] | None = None,
    column_name: str = "head",
    centered: bool = False,
) -> None:
    """Save a heatmap of ``values (L, N)``: one row per layer (0 at the top), one column per head or position.

    Args:
        values: the numbers, ``(L, N)``.
        path: where the figure goes, written atomically in the format of its suffix (.png, .svg, .pdf, .jpg).
        title: the figure title. column_labels: N labels (default ``0 .. N-1``). column_name: the x-axis name.
        centered: a diverging colour scale symmetric around 0 (for signed effects); otherwise 0 to the maximum.

    Raises:
        ValueError: ``values`` that are not 2-D, labels of the wrong count, or an unknown suffix.
    """
    figure_format(path)
    if values.dim() != 2:
        raise ValueError(f"values must be (layers, columns), got shape {tuple(values.shape)}")
    rows, cols = values.shape
    labels = [str(c) for c in range(cols)] if column_labels is None else list(column_labels)
    if len(labels) != cols:
        raise ValueError(f"{len(labels)} column labels for {cols} columns")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = values.detach().float().cpu().numpy()
    top = max(float(abs(grid).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(2.0 + 0.5 * max(cols, 4), 1.2 + 0.25 * max(rows, 6)))
    cmap, low = ("RdBu_r", -top) if centered else ("Blues", min(0.0, float(grid.min())))
    image = ax.imshow(grid, cmap=cmap, vmin=low, vmax=top, aspect="auto")
    ax.set_xticks(range(cols), labels=labels, rotation=45 if column_labels is not None else 0, ha="right")
    ax.set_yticks(range(rows), labels=[str(r) for r in range(rows)], fontsize=7 if rows > 12 else None)
    ax.set_xlabel(column_name)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
