"""The ``"tiled"`` backend: exact attention one tile at a time, as fused kernels do it (FlashAttention-2).

The plain formula ``softmax(Q Kᵀ · scale) V`` builds the whole ``(T, S)`` matrix of scores. This backend
never does: it walks over tiles of ``block_q`` queries by ``block_k`` keys and keeps, per query row, only
three running quantities. For one block of queries ``Q_i`` and key blocks ``j = 1, 2, ...``:

1. **Scores of one tile**: ``s = Q_i K_jᵀ · scale`` (then ``score_mod``, then the mask: -inf where
   forbidden). Tiles that the mask empties are skipped; tiles it leaves full need no mask.
2. **Running maximum**: ``m_new = max(m, rowmax(s))``. Subtracting it keeps every ``exp`` ≤ 1.
3. **Online softmax**: ``p = exp(s - m_new)``; what was summed so far was relative to the old maximum, so
   it is rescaled by ``c = exp(m - m_new)``: the row sums ``l = c·l + rowsum(p)`` and the unnormalised
   output ``acc = c·acc + p V_j``.
4. **Finish**: ``out_i = acc / l`` and the log-sum-exp ``lse_i = m + log l``, the only thing saved for the
   backward pass. Memory beyond the inputs: one tile plus ``O(T)`` numbers, not ``O(T·S)``.

A row with no allowed key has ``l = 0``: its output is 0 and its ``lse`` is ``-inf``.

**Backward** (recompute instead of storing the weights): with ``D_i = rowsum(dO_i ∘ O_i)``, for each tile
recompute ``P = exp(s - lse_i)`` (the exact softmax weights, because ``lse`` is the full row's
normaliser), then ``dV_j += Pᵀ dO_i``, ``dP = dO_i V_jᵀ``, ``dS = P ∘ (dP - D_i)``,
``dQ_i += dS K_j · scale`` and ``dK_j += dSᵀ Q_i · scale``. ``D_i`` stands for ``Σ_j P_ij dP_ij``,
the softmax Jacobian's correction, computed once per row from the output instead of from ``P``.

**Merging partial results**: attention over two disjoint sets of keys ``A`` and ``B`` gives
``(out_a, lse_a)`` and ``(out_b, lse_b)``; attention over ``A ∪ B`` is
``lse = log(exp(lse_a) + exp(lse_b))`` and ``out = exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b``
(:func:`merge_partials`). This is how a sequence split over devices (ring attention) is put together,
and the backward of the whole is :func:`tiled_backward` of each part called with the *merged*
``out`` and ``lse``: the parts' gradients then add up.

``score_mod(score, b, h, q_idx, kv_idx)`` changes scaled scores elementwise before the mask, for biases a
boolean mask cannot express, e.g. ALiBi ``score - slope[h] * (q_idx - kv_idx)`` or soft-capping
``cap * tanh(score / cap)``. Its gradient with respect to the score is taken by autograd on each tile;
tensors it closes over (such as learnable slopes) receive no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattention import checks
from selfattention.backends.recompute import recompute_attention
from selfattention.backends.tiles import AnyMask, Tiles, apply_mask
from selfattention.steps import ScoreMod

BLOCK_Q = 256
"""Default number of queries per tile."""
BLOCK_K = 512
"""Default number of keys per tile."""


def _tile_scores(
    tiles: Tiles,
    q_scaled: Tensor,
    k_j: Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    partial: bool,
    score_mod: ScoreMod | None,
) -> tuple[Tensor, Tensor]:
    """``(raw, final)`` scores of one tile: raw ``Q_i K_jᵀ · scale``; final after score_mod and mask."""
    raw = q_scaled @ k_j.transpose(-2, -1)  # (..., bq, D) @ (..., D, bk) -> (..., bq, bk)
    scores = raw
    if score_mod is not None:
        scores = score_mod(raw, *tiles.indices(rows, cols))
    if partial:
        scores = apply_mask(scores, tiles.tile_mask(rows, cols))
    return raw, scores


def tiled_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    mask: AnyMask = None,
    causal: bool = False,
    score_mod: ScoreMod | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    q_offset: int = 0,
    kv_offset: int = 0,
    total: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention by online softmax over key tiles; returns the output and each row's log-sum-exp.

    Not differentiable itself (see :func:`tiled_backward` and the ``"tiled"`` backend's autograd
    Function). Half and bfloat16 inputs are computed in float32.

    Args:
        q: ``(..., T, D)``; k: ``(..., S, D)``; v: ``(..., S, E)``.
        scale: multiplies ``q · k``.
        mask: boolean (``True`` = may attend) or float (added) tensor broadcastable to ``(..., T, S)``,
            or a mask description (evaluated at global positions, see ``q_offset``).
        causal: also apply the bottom-right causal mask over this call's ``T`` and ``S``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` applied to scaled scores.
        block_q, block_k: tile sizes.
        q_offset, kv_offset: global position of ``q[..., 0, :]`` and ``k[..., 0, :]`` for mask
            descriptions and ``score_mod`` (a chunk of a longer sequence); ``total``: that sequence's
            ``(T_total, S_total)``, default ``(q_offset + T, kv_offset + S)``.

    Returns:
        ``(out, lse)``: out ``(..., T, E)`` in ``q``'s dtype; lse ``(..., T)`` in float32 (float64 for
        float64 inputs), ``-inf`` with ``out`` 0 for rows that may attend to no key.

    >>> q = torch.randn(5, 4); out, lse = tiled_forward(q, q, q, scale=0.5, causal=True, block_k=2)
    >>> torch.allclose(out, torch.softmax((q @ q.T * 0.5).masked_fill(torch.ones(5, 5).triu(1).bool(),
    ...     float("-inf")), -1) @ q, atol=1e-6)
    True
    """
    tiles = Tiles(q, k, mask=mask, causal=causal, block_q=block_q, block_k=block_k,
                  q_offset=q_offset, kv_offset=kv_offset, total=total)  # fmt: skip
    work = checks.work_dtype(q.dtype)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    out = torch.zeros(*lead, q.shape[-2], v.shape[-1], dtype=work, device=q.device)
    lse = torch.empty((*lead, q.shape[-2]), dtype=work, device=q.device)  # every query block writes its rows
    for i, q0, q1 in tiles.query_blocks():
        q_scaled = q[..., q0:q1, :].to(work) * scale
        m = torch.full((*lead, q1 - q0), -math.inf, dtype=work, device=q.device)  # running max
        total_sum = torch.zeros_like(m)  # running row sum l
        acc = torch.zeros(*lead, q1 - q0, v.shape[-1], dtype=work, device=q.device)  # unnormalised output
        for _, k0, k1, partial in tiles.key_blocks(i):
            _, s = _tile_scores(tiles, q_scaled, k[..., k0:k1, :].to(work), (q0, q1), (k0, k1), partial,
                                score_mod)  # fmt: skip
            m_new = torch.maximum(m, s.amax(dim=-1))
            shift = torch.where(m_new == -math.inf, 0.0, m_new)  # a row with nothing allowed yet: exp -> 0
            p = torch.exp(s - shift.unsqueeze(-1))  # (..., bq, bk)
            correction = torch.exp(m - shift)  # rescales what was summed relative to the old maximum
            total_sum = total_sum * correction + p.sum(dim=-1)
            acc = acc * correction.unsqueeze(-1) + p @ v[..., k0:k1, :].to(work)
            m = m_new
        # a row that saw a key has l >= 1 (its maximum adds exp(0) = 1); a row with none: l = 0, m = -inf
        out[..., q0:q1, :] = acc / total_sum.clamp_min(1.0).unsqueeze(-1)  # 0 / 1 = 0 for a row with none
        lse[..., q0:q1] = m + torch.log(total_sum)  # -inf + log 0 = -inf for a row with none
    return out.to(q.dtype), lse


def tiled_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    *,
    scale: float,
    mask: AnyMask = None,
    causal: bool = False,
    score_mod: ScoreMod | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    q_offset: int = 0,
    kv_offset: int = 0,
    total: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention with respect to q, k, v, recomputing each tile from ``lse`` (FlashAttention-2).

    ``out`` and ``lse`` are those of the *whole* attention the gradient is for: when keys were split into
    parts and merged with :func:`merge_partials`, call this once per part with the merged ``out`` and
    ``lse`` and that part's ``k``, ``v`` (and offsets); dq adds up over the parts, dk and dv belong to
    each part.

    Args:
        q, k, v, scale, mask, causal, score_mod, block_q, block_k, q_offset, kv_offset, total: as for
            :func:`tiled_forward`.
        out: ``(..., T, E)`` and lse ``(..., T)``: the forward results.
        grad_out: ``(..., T, E)``, the gradient of the loss with respect to ``out``.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of ``q``, ``k``, ``v``. Rows with ``lse = -inf`` (no key
        allowed) contribute nothing.
    """
    tiles = Tiles(q, k, mask=mask, causal=causal, block_q=block_q, block_k=block_k,
                  q_offset=q_offset, kv_offset=kv_offset, total=total)  # fmt: skip
    work = checks.work_dtype(q.dtype)
    grad_out, out = grad_out.to(work), out.to(work)
    delta = (grad_out * out).sum(dim=-1)  # D_i = rowsum(dO ∘ O), (..., T)
    lse = torch.where(torch.isfinite(lse), lse, math.inf).to(work)  # no key allowed: P = exp(-inf) = 0
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    dq = torch.zeros(*lead, *q.shape[-2:], dtype=work, device=q.device)
    dk = torch.zeros(*lead, *k.shape[-2:], dtype=work, device=q.device)
    dv = torch.zeros(*lead, *v.shape[-2:], dtype=work, device=q.device)
    for i, q0, q1 in tiles.query_blocks():
        q_i = q[..., q0:q1, :].to(work)
        q_scaled, do_i = q_i * scale, grad_out[..., q0:q1, :]
        lse_i, delta_i = lse[..., q0:q1].unsqueeze(-1), delta[..., q0:q1].unsqueeze(-1)
        for _, k0, k1, partial in tiles.key_blocks(i):
            k_j, v_j = k[..., k0:k1, :].to(work), v[..., k0:k1, :].to(work)
            with torch.enable_grad():
                raw, s = _tile_scores(tiles, q_scaled.detach().requires_grad_(score_mod is not None), k_j,
                                      (q0, q1), (k0, k1), partial, score_mod)  # fmt: skip
            p = torch.exp(s.detach() - lse_i)  # the softmax weights of this tile, recomputed
            dv[..., k0:k1, :] += p.transpose(-2, -1) @ do_i
            dp = do_i @ v_j.transpose(-2, -1)  # (..., bq, bk)
            ds = p * (dp - delta_i)
            if score_mod is not None:  # through score_mod back to the raw scaled scores
                (ds,) = torch.autograd.grad(s, raw, ds)
            dq[..., q0:q1, :] += ds @ k_j * scale
            dk[..., k0:k1, :] += ds.transpose(-2, -1) @ q_scaled
    return (
        dq.sum_to_size(q.shape).to(q.dtype),
        dk.sum_to_size(k.shape).to(k.dtype),
        dv.sum_to_size(v.shape).to(v.dtype),
    )


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over two disjoint key sets, from each set's ``(out, lse)``; differentiable.

    ``lse = logaddexp(lse_a, lse_b)``; ``out = exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b``. A row
    with ``lse = -inf`` on one side takes the other side; on both sides it stays ``(0, -inf)``.

    Args:
        out_a, out_b: ``(..., T, E)``. lse_a, lse_b: ``(..., T)``.

    Returns:
        ``(out, lse)`` in the dtypes of ``out_a`` and ``lse_a``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isfinite(lse), lse, 0.0)
    weight_a = torch.exp(lse_a - finite).unsqueeze(-1)  # -inf side: weight 0
    weight_b = torch.exp(lse_b - finite).unsqueeze(-1)
    out = weight_a * out_a + weight_b * out_b  # in lse's dtype (or out's, if wider)
    return out.to(out_a.dtype), lse


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: AnyMask,
    causal: bool,
    scale: float,
    dropout_p: float,
    return_weights: bool,
    score_mod: ScoreMod | None = None,
) -> tuple[Tensor, None]:
    """The backend function: :func:`tiled_forward` with a recomputing backward (no dropout, no weights)."""
    assert dropout_p == 0 and not return_weights, "checked by choose_backend"
    return attention_with_lse(query, key, value, mask=mask, causal=causal, scale=scale, score_mod=score_mod)[0], None


def attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, *, mask: AnyMask, causal: bool, scale: float,
    score_mod: ScoreMod | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(context, lse)``: the backend's output and the log-sum-exp its forward kernel computed anyway."""
    options = {"scale": scale, "mask": mask, "causal": causal, "score_mod": score_mod,
               "block_q": BLOCK_Q, "block_k": BLOCK_K}  # fmt: skip
    return recompute_attention(query, key, value, forward=tiled_forward, backward=tiled_backward, options=options)
