"""The steps of self-attention as pure functions: the leaf that :mod:`selfattention.functional` and every
backend import.

:func:`selfattention.functional.attention` checks its inputs and hands them to a backend; the ``"math"``
backend runs these steps in matrix form, the others compute the same thing another way. Nothing here
imports a backend or :mod:`selfattention.functional`, so every import arrow points one way:
``functional -> backends -> steps -> checks -> masks``. The shape notation is the one stated in
:mod:`selfattention.functional`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from selfattention import checks
from selfattention.checks import LOW_PRECISION

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``score_mod(score, b, h, q_idx, kv_idx) -> score``: an elementwise change of the scaled scores."""


def attention_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Step 1: the dot product of every query with every key, ω = Q Kᵀ.

    Args:
        queries: ``(..., T, D)``.
        keys: ``(..., S, D)``.

    Returns:
        Scores ω of shape ``(..., T, S)``; ``ω[..., i, j] = Q_i · K_j``.

    Raises:
        ValueError: when the query and key widths differ.

    >>> attention_scores(torch.ones(2, 3), torch.ones(4, 3)).shape
    torch.Size([2, 4])
    """
    checks.same_width(queries, keys)
    return queries @ keys.transpose(-2, -1)  # (..., T, D) @ (..., D, S) -> (..., T, S)


def attention_weights(scores: Tensor, *, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Step 2: turn scores into weights, α = softmax over the keys of ``ω · scale`` with ``mask`` applied.

    ``scale=None`` means no scaling (the worked example's unscaled softmax); :func:`attention` passes
    ``1/sqrt(D)`` by default. Each row of α sums to 1, except a row whose keys are all masked: it is all
    zeros, and neither it nor its gradient contains NaN. Half and bfloat16 scores are computed in float32
    and returned in their own dtype.

    Args:
        scores: ω, ``(..., T, S)``.
        mask: boolean (``True`` = may attend) or float (added to the scaled scores), broadcastable to
            ``scores``.
        scale: multiplies the scores before the softmax.

    Returns:
        Weights α, ``(..., T, S)``, in the dtype of ``scores``.

    Raises:
        TypeError: for an integer mask. ValueError: for a mask that does not broadcast to the scores.

    >>> attention_weights(torch.tensor([[0.0, 0.0]])).tolist()
    [[0.5, 0.5]]
    """
    if mask is not None:
        checks.mask(mask, tuple(scores.shape))
    dtype = scores.dtype
    x = scores.float() if dtype in LOW_PRECISION else scores
    if scale is not None:
        x = x * scale
    if mask is not None:
        x = x.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else x + mask.to(x.dtype)
    return softmax_rows(x).to(dtype)


def softmax_rows(x: Tensor) -> Tensor:
    """Softmax over the last dimension that leaves a row of only ``-inf`` at zero (no NaN, nor in its gradient).

    A stable softmax: subtract the row maximum (0 where the whole row is -inf, so that exp gives exact
    zeros), and divide by the row sum only where it is positive.

    >>> softmax_rows(torch.tensor([[0.0, 0.0], [-math.inf, -math.inf]])).tolist()
    [[0.5, 0.5], [0.0, 0.0]]
    """
    row_max = x.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(x - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(total > 0, total, torch.ones_like(total))


def context_vectors(weights: Tensor, values: Tensor) -> Tensor:
    """Step 3: each query's context vector is the weighted sum of the values, z_i = Σ_j α_ij V_j.

    Args:
        weights: α, ``(..., T, S)``.
        values: ``(..., S, E)``.

    Returns:
        Context vectors z, ``(..., T, E)``: one per query, as wide as a value vector (not as long as the
        sequence).

    Raises:
        ValueError: when the number of weights per query differs from the number of values.
    """
    if weights.shape[-1] != values.shape[-2]:
        raise ValueError(f"weights have {weights.shape[-1]} keys per query but values have {values.shape[-2]} rows")
    return weights @ values.to(weights.dtype)  # (..., T, S) @ (..., S, E) -> (..., T, E)


def causal_mask(num_queries: int, num_keys: int, *, device: torch.device | str | None = None) -> Tensor:
    """The causal mask aligned bottom-right: query ``i`` may attend to key ``j`` when ``j <= i + S - T``.

    With ``T == S`` this is the usual lower triangle. With fewer queries than keys (decoding with a KV
    cache) the last query sees every key. With more queries than keys, the first ``T - S`` queries see no
    key at all and get zero context vectors.

    Returns:
        Boolean ``(T, S)``, ``True`` = may attend.

    >>> causal_mask(2, 3).tolist()
    [[True, True, False], [True, True, True]]
    """
    rows = torch.arange(num_queries, device=device).unsqueeze(-1)
    cols = torch.arange(num_keys, device=device)
    return cols <= rows + (num_keys - num_queries)
