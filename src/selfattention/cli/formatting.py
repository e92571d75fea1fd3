"""How ``explain`` prints a walk-through of the four steps: vectors, matrices and the JSON fields.

``explain`` on the worked example (:mod:`selfattention.cli.explain`) and on a model's head
(:mod:`selfattention.cli.explain_model`) share these, so the two print numbers the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from selfattention.walkthrough import Walkthrough


def vector(values: Tensor | Sequence[float], shown: int | None = None) -> str:
    """``[0.4419, 0.6515, ...]`` at four decimals; past ``shown`` numbers, the rest elided with the count.

    >>> vector([0.25, 1.0]), vector([1.0, 2.0, 3.0], shown=2)
    ('[0.2500, 1.0000]', '[1.0000, 2.0000, ...] (3 numbers)')
    """
    numbers = [float(v) for v in values]
    cells = ", ".join(f"{v:.4f}" for v in numbers[:shown])
    return f"[{cells}, ...] ({len(numbers)} numbers)" if shown is not None and len(numbers) > shown else f"[{cells}]"


def matrix(rows: Tensor, row_labels: Sequence[str], col_labels: Sequence[str] | None = None) -> list[str]:
    """The lines of a labelled table of ``rows (R, N)``, four decimals, column labels cut to 8 characters."""
    width = max(8, *(len(t) + 1 for t in row_labels))
    lines = []
    if col_labels is not None:
        lines.append(" " * width + "".join(f"{label[:8]:>9}" for label in col_labels))
    for label, row in zip(row_labels, rows, strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{float(v):9.4f}" for v in row))
    return lines


def projections_document(projections: tuple[Tensor, Tensor, Tensor]) -> dict[str, Any]:
    """``{"W_query": ..., "W_key": ..., "W_value": ...}`` as nested lists."""
    return dict(zip(("W_query", "W_key", "W_value"), (w.tolist() for w in projections), strict=True))


def steps_document(walk: Walkthrough) -> dict[str, Any]:
    """The four steps' tensors as JSON fields, in the order both documents print them."""
    return {
        "queries": walk.queries.tolist(),
        "keys": walk.keys.tolist(),
        "values": walk.values.tolist(),
        "scale": walk.scale,
        "causal": walk.causal,
        "scores": walk.scores.tolist(),
        "weights": walk.weights.tolist(),
        "context": walk.context.tolist(),
    }
