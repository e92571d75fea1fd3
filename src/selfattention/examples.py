"""The worked example: "Your journey starts with one step", each token embedded in 3 dimensions."""

from __future__ import annotations

import torch
from torch import Tensor

TOKENS: tuple[str, ...] = ("Your", "journey", "starts", "with", "one", "step")

EMBEDDINGS: tuple[tuple[float, float, float], ...] = (
    (0.43, 0.15, 0.89),  # Your
    (0.55, 0.87, 0.66),  # journey
    (0.57, 0.85, 0.64),  # starts
    (0.22, 0.58, 0.33),  # with
    (0.77, 0.25, 0.10),  # one
    (0.05, 0.80, 0.55),  # step
)


def embeddings(dtype: torch.dtype = torch.float32) -> Tensor:
    """The example's token embeddings as a ``(6, 3)`` tensor (one row per token)."""
    return torch.tensor(EMBEDDINGS, dtype=dtype)
