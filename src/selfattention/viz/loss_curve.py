"""A loss curve: training loss every step (raw and smoothed) and validation loss at each evaluation."""

from __future__ import annotations

import os
from collections.abc import Sequence

from selfattention.viz.figures import figure_format, save_figure


def plot_losses(
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]],
    path: str | os.PathLike[str],
    *,
    title: str = "loss",
    smoothing: int = 50,
) -> None:
    """Save a of the losses (nats per token) against the step.

    Args:
        train: ``(step, loss)`` for each training step; drawn faintly, with a moving average of
            ``smoothing`` steps on top.
        val: ``(step, loss)`` at each validation.
        path: where the figure goes, written atomically in the format of its suffix (.png, .svg, .pdf, .jpg).
        title: the figure title.

    Raises:
        ValueError: when there is nothing to plot;
            or a path whose suffix is not .png, .svg, .pdf or .jpg.
    """
    figure_format(path)  # refuse an unknown suffix before drawing
    if not train and not val:
        raise ValueError("no losses to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        window = max(1, min(smoothing, len(losses)))
        averaged = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, averaged, color="tab:blue", label=f"train (mean of {window} steps)")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
        ax.annotate(f"{losses[-1]:.3f}", (steps[-1], losses[-1]), textcoords="offset points", xytext=(4, 6))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
