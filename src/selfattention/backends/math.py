"""The ``"math"`` backend: the three steps in matrix form. This is the reference every other backend meets."""

from __future__ import annotations

import torch
from torch import Tensor

from selfattention.checks import LOW_PRECISION
from selfattention.steps import attention_scores, attention_weights, causal_mask, context_vectors


def combined_mask(
    mask: Tensor | None, causal: bool, num_queries: int, num_keys: int, device: torch.device
) -> Tensor | None:
    """``mask`` and the bottom-right causal mask together (a float mask becomes -inf where causal forbids)."""
    if not causal:
        return mask
    allowed = causal_mask(num_queries, num_keys, device=device)  # (T, S)
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    return_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ · scale + mask) V with explicit intermediates; half/bfloat16 computed in float32."""
    dtype = query.dtype
    if dtype in LOW_PRECISION:
        query, key, value = query.float(), key.float(), value.float()
    mask = combined_mask(mask, causal, query.shape[-2], key.shape[-2], query.device)
    scores = attention_scores(query, key)  # (..., T, S)
    weights = attention_weights(scores, mask=mask, scale=scale)  # (..., T, S)
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    context = context_vectors(weights, value)  # (..., T, E)
    return context.to(dtype), (weights.to(dtype) if return_weights else None)
