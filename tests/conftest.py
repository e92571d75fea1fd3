"""Shared test helpers: an independent float64 reference for attention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ · scale + mask) V in float64, written independently of the library.

    Grouped key/value heads are repeated; the causal mask is aligned bottom-right; rows with no allowed key
    give zero weights. Returns ``(context, weights)`` in float64.
    """
    q, k, v = query.double(), key.double(), value.double()
    if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    t, s = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    if causal:
        allowed = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
        scores = scores.masked_fill(~allowed, -math.inf)
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return weights @ v, weights


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded generator so that every test draws the same numbers."""
    return torch.Generator().manual_seed(0)
