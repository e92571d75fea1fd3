"""The ``"loop"`` backend: attention written one query and one key at a time, as the worked example does.

It computes exactly what ``"math"`` computes, only slowly, so that each line can be read as one step of the
formula. Leading dimensions (batch, heads) are carried along by elementwise operations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattention.checks import LOW_PRECISION
from selfattention.steps import softmax_rows


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
    """For each query i: scores ω_ij = q_i · k_j, weights α_ij = softmax_j(ω_ij), context z_i = Σ_j α_ij v_j."""
    dtype = query.dtype
    if dtype in LOW_PRECISION:
        query, key, value = query.float(), key.float(), value.float()
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    if mask is not None:
        mask = mask.expand(*lead, num_queries, num_keys)  # (T, 1), (B, 1, 1, S)... -> (..., T, S)
    contexts, weight_rows = [], []
    for i in range(num_queries):
        q_i = query[..., i, :]
        scores_i = []
        for j in range(num_keys):
            score = (q_i * key[..., j, :]).sum(-1) * scale  # ω_ij = q_i · k_j, scaled
            if causal and j > i + (num_keys - num_queries):
                score = torch.full_like(score, -math.inf)  # a future key: not allowed
            if mask is not None:
                m = mask[..., i, j]
                score = score.masked_fill(~m, -math.inf) if m.dtype == torch.bool else score + m
            scores_i.append(score.expand(lead))
        omega = torch.stack(scores_i, dim=-1)  # (..., S)
        alpha = softmax_rows(omega)  # α_i: sums to 1 (0 if every key is masked)
        z_i = torch.zeros(*lead, value.shape[-1], dtype=value.dtype, device=value.device)
        for j in range(num_keys):
            z_i = z_i + alpha[..., j : j + 1] * value[..., j, :]  # z_i += α_ij v_j
        contexts.append(z_i)
        weight_rows.append(alpha)
    context = torch.stack(contexts, dim=-2)  # (..., T, E)
    weights = torch.stack(weight_rows, dim=-2) if return_weights else None  # (..., T, S)
    return context.to(dtype), (weights.to(dtype) if weights is not None else None)
