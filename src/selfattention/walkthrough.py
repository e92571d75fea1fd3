"""The worked example's walk-through as data: every intermediate of the four steps, for a command to print."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattention import checks
from selfattention.functional import attention_scores, attention_weights, causal_mask, context_vectors


@dataclass(frozen=True)
class Walkthrough:
    """Tokens ``x (T, C)`` through the four steps; all tensors are float32 and detached.

    ``projections`` holds ``(W^Q, W^K, W^V)`` each ``(C, D)``, or ``None`` when ``q = k = v = x``.
    """

    tokens: list[str]
    inputs: Tensor  # x (T, C)
    projections: tuple[Tensor, Tensor, Tensor] | None
    queries: Tensor  # (T, D)
    keys: Tensor  # (T, D)
    values: Tensor  # (T, D)
    scale: float | None
    causal: bool
    scores: Tensor  # ω (T, T)
    weights: Tensor  # α (T, T)
    context: Tensor  # z (T, D)


def random_projections(d_in: int, d_out: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``W^Q, W^K, W^V`` of shape ``(d_in, d_out)`` drawn with ``torch.rand`` in that order after seeding.

    This is the order the chapter-3 ``SelfAttention_v1`` class uses, so the numbers agree with it.
    """
    if d_out < 1:
        raise ValueError(f"projection width must be at least 1, got {d_out}")
    torch.manual_seed(seed)
    return torch.rand(d_in, d_out), torch.rand(d_in, d_out), torch.rand(d_in, d_out)


def walk(
    tokens: Sequence[str],
    inputs: Tensor,
    *,
    projections: tuple[Tensor, Tensor, Tensor] | None = None,
    scaled: bool = False,
    causal: bool = False,
) -> Walkthrough:
    """Run the four steps explicitly and keep every intermediate.

    Args:
        tokens: T labels. inputs: x, ``(T, C)``.
        projections: ``(W^Q, W^K, W^V)`` each ``(C, D)``; ``None`` uses the embeddings themselves.
        scaled: divide the scores by ``sqrt(D)``.
        causal: each token attends only to itself and the tokens before it.
    """
    x = inputs.float()
    if projections is None:
        queries = keys = values = x
    else:
        w_query, w_key, w_value = projections
        queries, keys, values = x @ w_query, x @ w_key, x @ w_value  # (T, C) @ (C, D) -> (T, D)
    scale = 1.0 / math.sqrt(keys.shape[-1]) if scaled else None
    mask = causal_mask(len(tokens), len(tokens)) if causal else None
    with torch.no_grad():
        scores = attention_scores(queries, keys)  # ω (T, T)
        weights = attention_weights(scores, mask=mask, scale=scale)  # α (T, T)
        context = context_vectors(weights, values)  # z (T, D)
    checks.overflowed("the context", context)  # "... is not finite although the inputs are"
    return Walkthrough(list(tokens), x, projections, queries, keys, values, scale, causal, scores, weights, context)


def find_query(tokens: Sequence[str], query: str) -> int:
    """The position of ``query`` in ``tokens``: an index (0-based) or a word (first match, case-insensitive
    when no exact match).

    Raises:
        ValueError: an index out of range or a word that is not among the tokens (naming them).
    """
    if query.lstrip("-").isdigit():
        index = int(query)
        if not 0 <= index < len(tokens):
            raise ValueError(
                f"query index {index} is out of range: the sentence has {len(tokens)} tokens (0-{len(tokens) - 1})"
            )
        return index
    if query in tokens:
        return list(tokens).index(query)
    lowered = [t.lower() for t in tokens]
    if query.lower() in lowered:
        return lowered.index(query.lower())
    raise ValueError(f"query {query!r} is not in the sentence; tokens are {list(tokens)}")
