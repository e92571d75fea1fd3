"""Saving a matplotlib figure in the format its file name asks for, atomically.

The suffix decides the format, case-insensitively: ``.png``, ``.svg``, ``.pdf``, ``.jpg``/``.jpeg``. Any other
suffix (or none) is refused with a ``ValueError`` before anything is drawn, so that ``weights.jpg`` never
holds PNG bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selfattention.files import atomic_path

FIGURE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg"}
"""File suffix -> the format name matplotlib's ``savefig`` takes."""


def figure_format(path: str | os.PathLike[str]) -> str:
    """The matplotlib format for ``path``'s suffix.

    >>> figure_format("weights.SVG")
    'svg'

    Raises:
        ValueError: for a suffix not in :data:`FIGURE_FORMATS`, naming it and the ones accepted.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        accepted = ", ".join(FIGURE_FORMATS)
        found = f"suffix {suffix!r}" if suffix else "no suffix"
        raise ValueError(f"cannot save a figure as {os.fspath(path)!r} ({found}); use one of {accepted}")
    return FIGURE_FORMATS[suffix]


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int) -> None:
    """Write the matplotlib figure ``fig`` to ``path`` in the format of its suffix, atomically.

    Raises:
        ValueError: for an unknown suffix (see :func:`figure_format`).
        OSError: when the folder does not exist.
    """
    kind = figure_format(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=kind, dpi=dpi)
