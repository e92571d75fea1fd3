"""A line chart of values across layers (or any labelled steps), one line per series."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from selfattention.viz.figures import figure_format, save_figure


def plot_lines(
    series: Mapping[str, Sequence[float]],
    x_labels: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
) -> None:
    """Save a line chart: one line per entry of ``series``, its values at the points ``x_labels``.

    Args:
        series: label -> one value per x label.
        x_labels: the names of the points on the x axis.
        path: where the figure goes, written atomically in the format of its suffix (.png, .svg, .pdf, .jpg).
        title: the figure title. ylabel: the y axis label.

    Raises:
        ValueError: a series whose length differs from the number of x labels, or no series at all;
            or a path whose suffix is not .png, .svg, .pdf or .jpg.
    """
    figure_format(path)  # refuse an unknown suffix before drawing
    if not series:
        raise ValueError("nothing to plot: no series given")
    for label, values in series.items():
        if len(values) != len(x_labels):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(x_labels)} x labels")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(x_labels), 4.5))
    for label, values in series.items():
        ax.plot(range(len(x_labels)), [float(v) for v in values], marker="o", label=label)
    ax.set_xticks(range(len(x_labels)), labels=list(x_labels), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
