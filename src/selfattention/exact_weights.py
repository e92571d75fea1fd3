"""Exact attention weights from the log-sum-exp a fused kernel kept, for any heads, rows or top-k keys.

A fused kernel never stores the weights α, but it knows each row's log-sum-exp
``lse_i = log Σ_j exp(scale · q_i · k_j + mask_ij)`` (see :mod:`selfattention.backends.logsumexp`). Then

    α_ij = exp(scale · q_i · k_j + mask_ij - lse_i)

is the softmax weight itself, not an approximation, and each row can be recomputed alone. The functions
here do that for a selection of heads and rows, a chunk of rows at a time, so that memory stays bounded
by :data:`CHUNK_ELEMENTS` scores whatever the sequence length (:func:`exact_top_k` never holds a
``(T, S)`` tensor). Shapes follow :mod:`selfattention.functional`: query ``(..., H, T, D)``, key
``(..., G, S, D)`` (query head ``h`` reads key head ``h // (H // G)``), lse ``(..., H, T)``; the mask is
``True`` where a query may attend (or a float mask, added), or a :class:`~selfattention.masks.MaskDescription`;
``causal`` is the bottom-right causal mask.

>>> q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
>>> lse = torch.logsumexp(q @ k.mT * 0.5, dim=-1)
>>> torch.allclose(exact_weights(q, k, lse, scale=0.5), torch.softmax(q @ k.mT * 0.5, dim=-1))
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from selfattention.masks import MaskDescription

CHUNK_ELEMENTS = 1 << 22
"""Weights computed at once (16 MiB in float32): the memory bound of every function here."""

Rows = tuple[int, int]
"""Query rows ``[start, stop)``."""


def _heads(query: Tensor, heads: Tensor | None) -> Tensor | None:
    if query.dim() < 3:
        return None
    return torch.arange(query.shape[-3], device=query.device) if heads is None else heads.to(query.device)


def _mask_part(mask: Tensor, heads: Tensor | None, rows: Rows, rank: int) -> Tensor:
    """The part of a tensor mask (broadcastable to ``(..., H, T, S)``) for the chosen heads and rows."""
    mask = mask.reshape((1,) * (rank - mask.dim()) + tuple(mask.shape))
    if heads is not None and rank >= 3 and mask.shape[-3] > 1:
        mask = mask.index_select(-3, heads)
    return mask[..., rows[0] : rows[1], :] if mask.shape[-2] > 1 else mask


def _described(mask: MaskDescription, query: Tensor, heads: Tensor | None, rows: Rows, num_keys: int) -> Tensor:
    """A mask description evaluated on the chosen heads and rows only, ``(..., h, r, S)``."""
    batch = math.prod(query.shape[:-3]) if query.dim() >= 4 else 1
    head = heads if heads is not None else torch.zeros(1, dtype=torch.long)
    b = torch.arange(batch).view(-1, 1, 1, 1)
    q = torch.arange(rows[0], rows[1]).view(1, 1, -1, 1)
    kv = torch.arange(num_keys).view(1, 1, 1, -1)
    allowed = mask.allowed(b, head.cpu().view(1, -1, 1, 1), q, kv, query.shape[-2], num_keys)
    allowed = allowed.expand(batch, len(head), rows[1] - rows[0], num_keys).to(query.device)
    return allowed.reshape(*query.shape[:-3], *allowed.shape[1:]) if query.dim() >= 3 else allowed[0, 0]


def masked_scores(
    query: Tensor,
    key: Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: Any = None,
    rows: Rows,
    heads: Tensor | None = None,
) -> Tensor:
    """``scale · q_i · k_j + mask_ij`` (``-inf`` where not allowed) for rows ``rows`` of the chosen heads.

    Returns ``(..., h, r, S)`` in float32 (float64 for float64 inputs), ``h`` the chosen heads (all by default).
    """
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    chosen = _heads(query, heads)
    q = query[..., rows[0] : rows[1], :]
    k = key
    if chosen is not None and key.dim() >= 3:
        group = query.shape[-3] // key.shape[-3]
        q = q.index_select(-3, chosen)
        k = key.index_select(-3, torch.div(chosen, group, rounding_mode="floor"))  # head h reads h // (H // G)
    scores = (q.to(work) @ k.to(work).transpose(-2, -1)) * scale  # (..., h, r, S)
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    if isinstance(mask, MaskDescription):
        scores = scores.masked_fill(~_described(mask, query, chosen, rows, num_keys), -math.inf)
    elif isinstance(mask, Tensor):
        part = _mask_part(mask, chosen, rows, scores.dim())
        scores = scores.masked_fill(~part, -math.inf) if part.dtype == torch.bool else scores + part.to(work)
    if causal:  # bottom-right: query i sees keys j <= i + S - T
        i = torch.arange(rows[0], rows[1], device=scores.device).unsqueeze(-1)
        j = torch.arange(num_keys, device=scores.device)
        scores = scores.masked_fill(j > i + num_keys - num_queries, -math.inf)
    return scores


def _chunks(query: Tensor, key: Tensor, rows: Rows, heads: Tensor | None) -> Iterator[Rows]:
    """Row ranges covering ``rows`` with at most :data:`CHUNK_ELEMENTS` scores each."""
    lead = math.prod(query.shape[:-3]) if query.dim() >= 4 else 1
    count = (query.shape[-3] if heads is None else len(heads)) if query.dim() >= 3 else 1
    step = max(1, CHUNK_ELEMENTS // max(1, lead * count * key.shape[-2]))
    for start in range(rows[0], rows[1], step):
        yield start, min(rows[1], start + step)


def _weights(scores: Tensor, lse: Tensor) -> Tensor:
    """``exp(scores - lse)``; a row with ``lse = -inf`` (no allowed key) gets zeros."""
    finite = torch.where(torch.isfinite(lse), lse.to(scores.dtype), math.inf)
    return torch.exp(scores - finite.unsqueeze(-1))


def _lse_part(lse: Tensor, heads: Tensor | None, rows: Rows) -> Tensor:
    part = lse[..., rows[0] : rows[1]]
    return part.index_select(-2, heads) if heads is not None and lse.dim() >= 2 else part


def _check(query: Tensor, key: Tensor, lse: Tensor, rows: Rows | None) -> Rows:
    if lse.shape != query.shape[:-1]:
        raise ValueError(f"lse must have shape {tuple(query.shape[:-1])} (query without D), got {tuple(lse.shape)}")
    num_queries = query.shape[-2]
    rows = (0, num_queries) if rows is None else rows
    if not 0 <= rows[0] <= rows[1] <= num_queries:
        raise ValueError(f"rows {rows} out of range for {num_queries} queries")
    return rows


def _weight_chunks(
    query: Tensor, key: Tensor, lse: Tensor, *, scale: float, causal: bool, mask: Any, heads: Tensor | None, rows: Rows
) -> Iterator[Tensor]:
    """α of the chosen heads, one chunk of rows after another, ``(..., h, r_chunk, S)`` each."""
    for part in _chunks(query, key, rows, heads):
        scores = masked_scores(query, key, scale=scale, causal=causal, mask=mask, rows=part, heads=heads)
        yield _weights(scores, _lse_part(lse, heads, part))


def _result(query: Tensor, heads: Tensor | None, rows: Rows, width: int, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised result for the chosen heads and rows, ``(..., h, r, width)``.

    The functions here fill it a chunk at a time rather than concatenating the chunks' results at the end:
    small results kept alive between one chunk's large temporaries and the next would split the freed space
    so that the next chunk's scores no longer fit there (glibc then grows the heap by about a chunk each
    time: 1.8 GiB for the top keys of 9 heads at 8192 tokens).
    """
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    count = () if heads is None else (len(heads),)
    return query.new_empty((*query.shape[:-3], *count, rows[1] - rows[0], width), dtype=dtype or work)


def _placed(chunks: Iterator[Tensor]) -> Iterator[tuple[tuple[Any, ...], Tensor]]:
    """Each chunk of rows with the index of its rows in the whole result, ``(..., start:stop, :)``."""
    start = 0
    for chunk in chunks:
        stop = start + chunk.shape[-2]
        yield (..., slice(start, stop), slice(None)), chunk
        start = stop


def exact_weights(
    query: Tensor,
    key: Tensor,
    lse: Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: Any = None,
    heads: Tensor | None = None,
    rows: Rows | None = None,
) -> Tensor:
    """α for the chosen heads (indices into ``H``, all by default) and rows ``[start, stop)`` (all by default).

    Returns:
        ``(..., h, r, S)`` in float32 (float64 for float64 inputs); the result is as large as asked for, the
        work beside it is one chunk.

    Raises:
        ValueError: an ``lse`` whose shape is not the query's without ``D``, or rows out of range.
    """
    rows = _check(query, key, lse, rows)
    chosen = _heads(query, heads)
    options = {"scale": scale, "causal": causal, "mask": mask, "heads": chosen, "rows": rows}
    parts = list(_weight_chunks(query, key, lse, **options))
    return torch.cat(parts, dim=-2) if parts else _result(query, chosen, (0, 0), key.shape[-2])


def exact_context(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lse: Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: Any = None,
    heads: Tensor | None = None,
    rows: Rows | None = None,
) -> Tensor:
    """z = α V for the chosen heads and rows, ``(..., h, r, E)``, with α recomputed a chunk of rows at a time;
    ``value`` is ``(..., G, S, E)`` like ``key``.

    Raises:
        ValueError: see :func:`exact_weights`.
    """
    rows = _check(query, key, lse, rows)
    chosen = _heads(query, heads)
    if chosen is not None and value.dim() >= 3:  # head h reads value head h // (H // G)
        value = value.index_select(-3, torch.div(chosen, query.shape[-3] // value.shape[-3], rounding_mode="floor"))
    options = {"scale": scale, "causal": causal, "mask": mask, "heads": chosen, "rows": rows}
    context = _result(query, chosen, rows, value.shape[-1])
    for place, weights in _placed(_weight_chunks(query, key, lse, **options)):
        torch.matmul(weights, value.to(weights.dtype), out=context[place])
    return context


def exact_top_k(
    query: Tensor,
    key: Tensor,
    lse: Tensor,
    k: int,
    *,
    scale: float,
    causal: bool = False,
    mask: Any = None,
    heads: Tensor | None = None,
    rows: Rows | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest weights of each row, exact, their key indices, and the mass of the other keys.

    Returns:
        ``(weights (..., h, r, k), indices (..., h, r, k), rest (..., h, r))`` with ``k`` capped at ``S``,
        weights in descending order, and ``rest = 1 - Σ weights`` (0 for a row with no allowed key). Memory
        is one chunk of scores plus the result, never ``(T, S)`` per head.

    Raises:
        ValueError: ``k < 1``, or see :func:`exact_weights`.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rows = _check(query, key, lse, rows)
    chosen = _heads(query, heads)
    k = min(k, key.shape[-2])
    options = {"scale": scale, "causal": causal, "mask": mask, "heads": chosen, "rows": rows}
    top_values, top_indices = _result(query, chosen, rows, k), _result(query, chosen, rows, k, torch.long)
    for place, weights in _placed(_weight_chunks(query, key, lse, **options)):
        top = torch.topk(weights, k, dim=-1)
        top_values[place], top_indices[place] = top.values, top.indices
    row_lse = _lse_part(lse, chosen, rows)
    rest = torch.where(torch.isfinite(row_lse), (1.0 - top_values.sum(-1)).clamp_min(0.0), 0.0)
    return top_values, top_indices, rest
