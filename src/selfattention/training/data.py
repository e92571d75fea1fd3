"""Training text: reading a corpus, splitting it, and drawing batches of next-token examples.

A batch is ``(inputs, targets)``, both ``(B, T)`` token ids, where ``targets`` is ``inputs`` shifted one
position to the left: at every position the model predicts the next token. Windows start at random offsets
drawn from a :class:`torch.Generator`, so the data order is part of the training state (saved with a
checkpoint) and is the same on every rank of a data-parallel run (each rank takes its own slice).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_CORPUS = "shakespeare.txt"
"""Package data: four Shakespeare plays (public domain), see ``selfattention/data/README.md``."""


def default_corpus() -> str:
    """The text of the corpus shipped with the package."""
    return resources.files("selfattention").joinpath("data", DEFAULT_CORPUS).read_text(encoding="utf-8")


def read_corpus(path: str | os.PathLike[str] | None = None) -> str:
    """The text of the UTF-8 file ``path``, or of the shipped corpus when ``path`` is ``None``.

    Raises:
        ValueError: naming the file, when it is empty, binary (contains NUL bytes) or not UTF-8.
        OSError: when it cannot be read.
    """
    if path is None:
        return default_corpus()
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise ValueError(f"corpus {path} is empty")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"corpus {path} looks binary (it contains a NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus {path} is not UTF-8 text (bad byte at offset {error.start})") from None


def split(ids: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Split a 1-D token sequence into its first ``1 - val_fraction`` (train) and the rest (validation)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(ids) * (1.0 - val_fraction))
    return ids[:cut], ids[cut:]


def check_length(name: str, ids: Tensor, block_size: int) -> None:
    """Raise ValueError unless ``ids`` holds at least one window of ``block_size + 1`` tokens."""
    if len(ids) < block_size + 1:
        raise ValueError(
            f"the {name} split has {len(ids)} tokens, fewer than context + 1 = {block_size + 1}; "
            "use a longer corpus or a shorter context"
        )


def sample_batch(
    ids: Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Draw ``world_size * batch_size`` random windows and return this rank's ``batch_size`` of them.

    Every rank draws the same offsets from its copy of ``generator``, so ``world_size`` ranks with batch
    ``b`` see together exactly the windows that one process with batch ``world_size * b`` sees.

    Args:
        ids: ``(N,)`` token ids.
        batch_size: windows per rank ``B``. block_size: tokens per window ``T``.
        generator: the source of the offsets (advanced by one draw).
        rank, world_size: this process's slice of the global batch.

    Returns:
        ``(inputs, targets)``, each ``(B, T)`` int64.
    """
    check_length("data", ids, block_size)
    starts = torch.randint(len(ids) - block_size, (world_size * batch_size,), generator=generator)
    mine = starts[rank * batch_size : (rank + 1) * batch_size]
    rows = mine[:, None] + torch.arange(block_size + 1)  # (B, T + 1) indices
    windows = ids[rows].long()
    return windows[:, :-1], windows[:, 1:]
