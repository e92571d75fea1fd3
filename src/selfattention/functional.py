"""The four steps of self-attention as pure functions, and :func:`attention`, which runs them all.

Shape notation, used in every comment and docstring of this package:

====  =====================================================================
B     batch
H     query heads
G     key/value heads (grouped-query attention: ``H % G == 0``)
T     queries (target length)
S     keys and values (source length)
D     width of one query/key vector (one head)
E     width of one value vector (usually ``E == D``)
C     model width (``d_in``, ``d_out`` of the modules)
...   any leading dimensions, e.g. ``(B, H)``
====  =====================================================================

The steps, for queries ``Q (..., T, D)``, keys ``K (..., S, D)`` and values ``V (..., S, E)``:

1. scores    ω = Q Kᵀ                        :func:`attention_scores`   ``(..., T, S)``
2. weights   α = softmax_j(ω · scale + mask) :func:`attention_weights`  ``(..., T, S)``
3. context   z = α V                         :func:`context_vectors`    ``(..., T, E)``

Masks follow one convention throughout the package: a boolean mask is ``True`` where a query *may attend*
to a key (as in :func:`torch.nn.functional.scaled_dot_product_attention`); a float mask is *added* to the
scaled scores. A query whose keys are all masked gets all-zero weights and a zero context vector.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from selfattention import checks
from selfattention.backends import choose_backend
from selfattention.backends.tiles import materialize_mask
from selfattention.checks import LOW_PRECISION
from selfattention.masks import MaskDescription, is_causal
from selfattention.steps import ScoreMod, attention_scores, attention_weights, causal_mask, context_vectors

__all__ = [
    "LOW_PRECISION",
    "ScoreMod",
    "attention",
    "attention_scores",
    "attention_weights",
    "broadcast_inputs",
    "causal_mask",
    "context_vectors",
    "expand_kv_heads",
    "materialize_mask",
]


@overload
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | MaskDescription | None = ...,
    causal: bool = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    backend: str = ...,
    return_weights: Literal[False] = ...,
    score_mod: ScoreMod | None = ...,
    bounds: tuple[float, float, float] | None = ...,
    return_lse: Literal[False] = ...,
) -> Tensor: ...
@overload
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | MaskDescription | None = ...,
    causal: bool = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    backend: str = ...,
    return_weights: Literal[True],
    score_mod: ScoreMod | None = ...,
    bounds: tuple[float, float, float] | None = ...,
    return_lse: Literal[False] = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | MaskDescription | None = ...,
    causal: bool = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    backend: str = ...,
    return_weights: Literal[False] = ...,
    score_mod: ScoreMod | None = ...,
    bounds: tuple[float, float, float] | None = ...,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | MaskDescription | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_weights: bool = False,
    score_mod: ScoreMod | None = None,
    bounds: tuple[float, float, float] | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention: ``softmax(Q Kᵀ · scale + mask) V``, through a chosen backend.

    The semantics follow :func:`torch.nn.functional.scaled_dot_product_attention` where the two overlap:
    default ``scale = 1/sqrt(D)``; boolean masks are ``True`` where attention is allowed and float masks
    are added; a query with ``H`` heads may use keys/values with ``G`` heads when ``H % G == 0``
    (grouped-query attention: query head ``h`` uses key/value head ``h // (H // G)``). Two choices differ
    from PyTorch and are deliberate:

    * ``causal=True`` aligns the mask **bottom-right**: query ``i`` sees keys ``j <= i + S - T``, so with a
      KV cache (fewer queries than keys) the last query sees every key. PyTorch aligns top-left. With
      ``T == S`` the two agree. ``causal`` and ``mask`` may be combined (both must allow a pair).
    * A query whose keys are all masked gets a zero context vector, never NaN.

    Backends (see :data:`selfattention.backends.BACKENDS`): ``"loop"`` (plain per-query loops, for
    reading), ``"math"`` (matrix form, the reference), ``"sdpa"`` (PyTorch's fused kernel), ``"tiled"``
    (flash-style online softmax in plain PyTorch, takes ``score_mod``), ``"blocksparse"`` (the fused
    kernel on the tiles a mask leaves non-empty) and ``"auto"``, which picks by the rules of
    :data:`selfattention.backends.AUTO`.

    One input contract holds for every backend (``docs/input-contract.md``), checked here before any
    backend runs: the batch dimensions of the query and of the keys/values broadcast as in PyTorch, a single
    query head broadcasts to ``G`` key/value heads; q, k, v share one dtype; ``T = 0`` or ``S = 0`` give
    zeros (a query with no key is a fully masked row); scores or sums that would overflow the work dtype
    (float32 for half and bfloat16) are refused, whichever the backend.

    Args:
        query: ``(..., H, T, D)`` or ``(T, D)``, ``D >= 1``.
        key: ``(..., G, S, D)`` or ``(S, D)``.
        value: ``(..., G, S, E)`` or ``(S, E)``, the same leading dimensions as ``key``.
        mask: boolean or float tensor, broadcastable to ``(..., H, T, S)``, or a mask description from
            :mod:`selfattention.masks` (materialised for backends that need a tensor).
        causal: apply the bottom-right causal mask.
        scale: multiplies the scores; ``None`` means ``1/sqrt(D)``.
        dropout_p: probability of zeroing a weight (survivors scaled by ``1/(1-p)``); pass 0 in eval.
        backend: a name from :data:`selfattention.backends.BACKENDS`, or ``"auto"``.
        return_weights: also return α (after dropout) from an eager backend.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` applied to the scaled scores before
            the mask (ALiBi, soft-capping); only the ``"tiled"`` backend takes it.
        bounds: ``(max |query|, max |key|, max |value|)`` when the caller has already checked the inputs
            (finite upper bounds, as a module with a KV cache keeps them); the inputs are then not scanned
            again. Bounds that are too small could let an overflow through: pass only measured ones.
        return_lse: also return each row's log-sum-exp from the same backend (its fused kernel computes it;
            see :mod:`selfattention.backends.logsumexp`), from which :mod:`selfattention.exact_weights`
            recomputes any weight exactly. Not with ``return_weights`` or dropout.

    Returns:
        Context ``(..., H, T, E)`` with the broadcast leading dimensions; with ``return_weights=True``,
        ``(context, weights (..., H, T, S))``; with ``return_lse=True``, ``(context, lse (..., H, T))``
        (float32, float64 for float64 inputs; ``-inf`` for a row with no allowed key).

    Raises:
        ValueError: mismatched or non-broadcasting shapes, ``D = 0``, non-finite inputs, inputs whose scores
            or weighted sums would overflow, a bad mask shape, an unknown backend, or a dropout probability
            outside [0, 1). TypeError: non-float or mixed-dtype inputs, an integer mask, a bool ``scale``.

    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> attention(x, x, x, scale=1.0).shape
    torch.Size([2, 2])
    """
    if return_lse and (return_weights or dropout_p > 0):
        raise ValueError(
            f"return_lse needs return_weights=False and no dropout (got return_weights={return_weights}, "
            f"dropout_p={dropout_p}): weights after dropout cannot be recomputed from the log-sum-exp"
        )
    largest = checks.qkv(query, key, value, bounds)
    lead = checks.leading(query, key)  # (..., H); refuses batches that do not broadcast, before any folding
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    if mask is not None:
        checks.mask(mask, (*lead, num_queries, num_keys))
    if is_causal(mask, num_queries, num_keys):
        mask, causal = None, True  # the same mask, and the fused kernel has a fast path for the flag
    if causal and num_queries == 1:
        causal = False  # bottom-right: a single query sees every key (a decoding step)
    checks.dropout(dropout_p)
    checks.scale(scale)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    chosen = choose_backend(
        backend,
        return_weights=return_weights,
        dropout_p=dropout_p,
        mask=mask,
        causal=causal,
        score_mod=score_mod,
        shape=(num_queries, num_keys),
    )
    # Grouped key/value heads are never copied where it can be avoided: a backend that takes them (the CPU
    # fused kernel's enable_gqa, measured faster than folding for a decoding step) gets them as they are;
    # otherwise the query heads sharing a key/value head are read as rows of one query block where that
    # computes the same, and only then are the key/value heads repeated.
    grouped = chosen.takes_grouped_heads and not return_lse and query.device.type == "cpu"
    folded = not grouped and _foldable(query, key, mask, causal, score_mod)
    if folded:
        query = fold_query_groups(query, key.shape[-3])
    query, key, value = broadcast_inputs(query, key, value, keep_kv_heads=grouped)
    checks.magnitudes(query, key, value, float(scale), largest)
    if scale <= 0:  # PyTorch's fused kernels return NaN or zeros in their causal mode for a scale <= 0
        query, scale = (-query, -scale) if scale < 0 else (query * 0, 1.0)  # the same scores, scale > 0
    weights: Tensor | None  # the weights, or the log-sum-exp with return_lse
    # No key, or nothing to compute (values of width 0 still have weights and a log-sum-exp); and never T = 0
    # for PyTorch's CPU flash kernel behind the "sdpa" log-sum-exp: it stops the process with SIGFPE.
    no_context = value.shape[-1] == 0 and not (return_weights or return_lse)
    if key.shape[-2] == 0 or query[..., 0].numel() == 0 or no_context:
        context, weights = _without_work(query, key, value)
        weights = _no_lse(query) if return_lse else weights
    else:
        if isinstance(mask, MaskDescription) and not chosen.takes_mask_descriptions:
            mask = materialize_mask(mask, query, key.shape[-2])
        extra = {"score_mod": score_mod} if score_mod is not None else {}
        options = {"mask": mask, "causal": causal, "scale": float(scale), **extra}
        if return_lse:
            context, weights = chosen.with_lse(query, key, value, **options)
        else:
            context, weights = chosen.fn(
                query, key, value, dropout_p=dropout_p, return_weights=return_weights, **options
            )
    checks.overflowed("the attention output", context)
    if folded:
        context = unfold_query_groups(context, num_queries)
        if weights is not None and return_lse:  # (..., G, H/G * T) -> (..., H, T)
            weights = unfold_query_groups(weights.unsqueeze(-1), num_queries)[..., 0]
        elif weights is not None:
            weights = unfold_query_groups(weights, num_queries)
    if return_weights or return_lse:
        assert weights is not None, f"backend {chosen.name!r} returned no weights"
        return context, weights
    return context


def _no_lse(query: Tensor) -> Tensor:
    """The log-sum-exp of rows with no key: ``-inf``, ``(..., T)``."""
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    return torch.full(query.shape[:-1], -math.inf, dtype=work, device=query.device)


def broadcast_inputs(
    query: Tensor, key: Tensor, value: Tensor, *, keep_kv_heads: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The inputs with the leading dimensions of the scores: ``(..., H, T, D)``, ``(..., H, S, D)``, ``(..., H, S, E)``.

    Grouped key/value heads are repeated (:func:`expand_kv_heads`), or with ``keep_kv_heads`` kept as
    ``(..., G, S, D)`` for a backend that maps query head ``h`` to key/value head ``h // (H // G)`` itself;
    every other leading dimension is broadcast as a view (no copy). See :func:`selfattention.checks.leading`
    for the rule.

    Raises:
        ValueError: when the leading dimensions do not broadcast.
    """
    lead = checks.leading(query, key)  # (..., H)
    kv_lead = lead
    if lead and query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] not in (1, lead[-1]):
        if keep_kv_heads:
            kv_lead = (*lead[:-1], key.shape[-3])
        else:  # grouped-query heads: (..., G, S, D) -> (..., H, S, D)
            key, value = expand_kv_heads(query, key, value)
    # views, no copies (a tensor that has the shape already is returned as a view of itself)
    query = query.expand(*lead, *query.shape[-2:])
    key, value = (x.expand(*kv_lead, *x.shape[-2:]) for x in (key, value))
    return query, key, value


def _foldable(
    query: Tensor, key: Tensor, mask: Tensor | MaskDescription | None, causal: bool, score_mod: ScoreMod | None
) -> bool:
    """Whether :func:`fold_query_groups` computes the same as repeating the key/value heads.

    Only when every query row of a head sees the same keys: no causal mask (or a single query, for which
    the bottom-right causal mask allows every key), a mask that is the same for every head and query
    (``(..., 1, 1, S)``, a padding mask) or none, and no ``score_mod`` (it reads the head index).
    """
    if query.dim() < 3 or key.dim() < 3 or score_mod is not None or isinstance(mask, MaskDescription):
        return False
    heads, kv_heads, num_queries = query.shape[-3], key.shape[-3], query.shape[-2]
    if not 1 < kv_heads < heads or heads % kv_heads or num_queries == 0 or (causal and num_queries > 1):
        return False
    return mask is None or all(size == 1 for size in mask.shape[-3:-1])  # (S,), (1, S), (..., 1, 1, S)


def fold_query_groups(query: Tensor, kv_heads: int) -> Tensor:
    """``(..., H, T, D)`` -> ``(..., G, H/G * T, D)``: the query heads that share a key/value head, as rows.

    Query head ``h`` reads key/value head ``h // (H // G)``, so heads ``g * H/G .. (g + 1) * H/G - 1`` stack
    into the rows of group ``g``; attention of each row is computed alone, hence the same numbers as with the
    key/value heads repeated, without copying them (decoding reads the whole KV cache every step).
    """
    *lead, heads, num_queries, width = query.shape
    return query.reshape(*lead, kv_heads, heads // kv_heads * num_queries, width)


def unfold_query_groups(rows: Tensor, num_queries: int) -> Tensor:
    """Undo :func:`fold_query_groups` on any per-row result: ``(..., G, H/G * T, X)`` -> ``(..., H, T, X)``."""
    *lead, kv_heads, folded, width = rows.shape
    return rows.reshape(*lead, kv_heads * (folded // num_queries), num_queries, width)


def _without_work(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Zero context ``(..., T, E)`` and weights ``(..., T, S)`` for calls with no key or an empty result.

    With no key to attend to, every query is a fully masked row: zeros, as everywhere else. The zeros are
    tied to the inputs so that a backward pass gives zero gradients rather than none.
    """
    context = query.new_zeros((*query.shape[:-1], value.shape[-1]))
    weights = query.new_zeros((*query.shape[:-1], key.shape[-2]))
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (query, key, value)):
        # zero times each (finite) entry, then summed: a sum of the entries themselves could overflow to inf
        # (half-precision queries of 100 do), and 0 * inf would make every output NaN
        tie = sum((0.0 * tensor).sum() for tensor in (query, key, value))
        context, weights = context + tie, weights + tie
    return context, weights


def expand_kv_heads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat key/value heads so that each of the ``H`` query heads has its own (grouped-query attention).

    Args:
        query: ``(..., H, T, D)``; key, value: ``(..., G, S, D|E)`` with ``H % G == 0``.

    Returns:
        key, value with ``H`` heads; unchanged when ``G == H`` or the inputs have no head dimension.

    Raises:
        ValueError: when ``H`` is not a multiple of ``G``.
    """
    if query.dim() < 3 or key.dim() < 3 or key.shape[-3] == query.shape[-3]:
        return key, value
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}) for grouped-query attention"
        )
    groups = heads // kv_heads
    # (..., G, S, D) -> (..., G * groups, S, D): head h reads key/value head h // groups
    return key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
