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
   backward pass. Memory beyond the inputs: a few tiles plus ``O(T + S)`` numbers, not ``O(T·S)``.

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
from selfattention.masks import MaskDescription
from selfattention.steps import ScoreMod

BLOCK_Q = 2048
"""Default number of queries per tile (the backend function may take fewer, see :func:`tile_sizes`)."""
BLOCK_K = 1024
"""Default number of keys per tile."""
TILE_LIMIT = 1 << 21
"""Most scores of one tile over every batch and head (8 MiB of float32), as measured fastest on the CPU for
dense attention at 4096 tokens, forward+backward: with one head 2048 x 1024 (93 ms; 512 x 1024: 116 ms,
256 x 512: 153 ms), with four heads 512 x 1024 (380 ms; 1024 x 2048: 450 ms). Larger tiles mean fewer
Python steps and fewer calls; past this size they fall out of the cache."""


def _tile_scores(
    tiles: Tiles,
    q_scaled: Tensor,
    k_t: Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    partial: bool,
    score_mod: ScoreMod | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(raw, final)`` scores of one tile from ``k_t = K_jᵀ``: raw ``Q_i K_jᵀ · scale`` (written into ``out``
    when given); final after score_mod and mask."""
    raw = torch.matmul(q_scaled, k_t, out=out)  # (..., bq, D) @ (..., D, bk) -> (..., bq, bk)
    scores = raw
    if score_mod is not None:
        # The backward differentiates ``scores`` with respect to ``raw``: a score_mod that edits its input
        # in place gets a copy there, or ``raw`` would become its own result and the gradient the identity.
        given = raw.clone() if raw.requires_grad else raw
        scores = score_mod(given, *tiles.indices(rows, cols))
    if partial:
        scores = apply_mask(scores, tiles.tile_mask(rows, cols))
    return raw, scores


class _Scratch:
    """One buffer per tile shape, reused by every tile of that shape for a product the loop writes anew each
    time: allocating and freeing tiles of megabytes made the memory allocator return pages to the system and
    fault them in again, a fifth of the dense forward+backward at 4096 tokens."""

    def __init__(self, lead: tuple[int, ...], like: Tensor) -> None:
        self.lead, self.like = lead, like
        self.buffers: dict[tuple[str, int, int], Tensor] = {}

    def __call__(self, name: str, rows: int, cols: int) -> Tensor:
        """The ``(..., rows, cols)`` buffer called ``name`` (its contents are overwritten by the caller)."""
        key = (name, rows, cols)
        if key not in self.buffers:
            self.buffers[key] = self.like.new_empty((*self.lead, rows, cols))
        return self.buffers[key]

    def product(self, a: Tensor, b: Tensor, name: str) -> Tensor:
        """``a @ b`` ``(..., rows, n) @ (..., n, cols)`` written into the buffer ``name``."""
        return torch.matmul(a, b, out=self(name, a.shape[-2], b.shape[-1]))


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
    q, k, v = q.detach(), k.detach(), v.detach()  # not differentiable itself: products can write into buffers
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    out = torch.zeros(*lead, q.shape[-2], v.shape[-1], dtype=work, device=q.device)
    lse = torch.empty((*lead, q.shape[-2]), dtype=work, device=q.device)  # every query block writes its rows
    k_t = k.to(work).transpose(-2, -1).contiguous()  # (..., D, S): Q Kᵀ without a transposed operand, faster
    scratch = _Scratch(lead, out)
    for i, q0, q1 in tiles.query_blocks():
        q_scaled = q[..., q0:q1, :].to(work) * scale
        m = torch.full((*lead, q1 - q0), -math.inf, dtype=work, device=q.device)  # running max
        total_sum = torch.zeros_like(m)  # running row sum l
        acc = torch.zeros(*lead, q1 - q0, v.shape[-1], dtype=work, device=q.device)  # unnormalised output
        for _, k0, k1, partial in tiles.key_blocks(i):
            buffer = scratch("scores", q1 - q0, k1 - k0)
            _, s = _tile_scores(tiles, q_scaled, k_t[..., k0:k1], (q0, q1), (k0, k1), partial, score_mod, buffer)
            m_new = torch.maximum(m, s.amax(dim=-1))
            shift = torch.where(m_new == -math.inf, 0.0, m_new)  # a row with nothing allowed yet: exp -> 0
            # (..., bq, bk), in place: the scores are not read again; a score_mod's result may be the caller's
            # tensor, or one that only broadcasts to the tile: subtracted out of place
            p = (s.sub_(shift.unsqueeze(-1)) if score_mod is None else s - shift.unsqueeze(-1)).exp_()
            correction = torch.exp(m - shift)  # rescales what was summed relative to the old maximum
            total_sum.mul_(correction).add_(p.sum(dim=-1))
            acc.mul_(correction.unsqueeze(-1)).add_(p @ v[..., k0:k1, :].to(work))
            m = m_new
        # a row that saw a key has l >= 1 (its maximum adds exp(0) = 1); a row with none: l = 0, m = -inf
        out[..., q0:q1, :] = acc.div_(total_sum.clamp_min(1.0).unsqueeze(-1))  # 0 / 1 = 0 for a row with none
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
    q, k, v = q.detach(), k.detach(), v.detach()  # as in tiled_forward; score_mod's gradient goes by q_scaled
    grad_out, out = grad_out.to(work), out.to(work)
    delta = (grad_out * out).sum(dim=-1)  # D_i = rowsum(dO ∘ O), (..., T)
    lse = torch.where(torch.isfinite(lse), lse, math.inf).to(work)  # no key allowed: P = exp(-inf) = 0
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    # Every product takes its operands untransposed (measured faster on the CPU): Kᵀ and Vᵀ are made once,
    # dQ, dKᵀ and dVᵀ are summed (each "+=" is add_() on a slice: "a[i] += b" would also copy the sum onto
    # itself), and dK, dV are transposed back at the end.
    k_w = k.to(work)
    k_t, v_t = k_w.transpose(-2, -1).contiguous(), v.to(work).transpose(-2, -1).contiguous()  # (..., D, S)
    dq = torch.zeros(*lead, *q.shape[-2:], dtype=work, device=q.device)
    dk_t = torch.zeros(*lead, k.shape[-1], k.shape[-2], dtype=work, device=q.device)
    dv_t = torch.zeros(*lead, v.shape[-1], v.shape[-2], dtype=work, device=q.device)
    scratch = _Scratch(lead, dq)
    for i, q0, q1 in tiles.query_blocks():
        q_scaled = q[..., q0:q1, :].to(work) * scale
        q_scaled_t = q_scaled.transpose(-2, -1).contiguous()  # (..., D, bq)
        do_i_t = grad_out[..., q0:q1, :].transpose(-2, -1).contiguous()  # (..., E, bq)
        lse_i, delta_i = lse[..., q0:q1].unsqueeze(-1), delta[..., q0:q1].unsqueeze(-1)
        for _, k0, k1, partial in tiles.key_blocks(i):
            buffer = scratch("scores", q1 - q0, k1 - k0) if score_mod is None else None  # autograd: no out=
            with torch.enable_grad():
                raw, s = _tile_scores(tiles, q_scaled.detach().requires_grad_(score_mod is not None),
                                      k_t[..., k0:k1], (q0, q1), (k0, k1), partial, score_mod, buffer)  # fmt: skip
            # the softmax weights of this tile, recomputed in place (out of place after a score_mod, whose
            # backward may read s)
            p = (s.sub_(lse_i) if score_mod is None else s.detach() - lse_i).exp_()
            dv_t[..., k0:k1].add_(do_i_t @ p)  # dVᵀ += dOᵀ P
            dp = scratch.product(grad_out[..., q0:q1, :], v_t[..., k0:k1], "dP")  # (..., bq, bk)
            ds = dp.sub_(delta_i).mul_(p)  # P ∘ (dP - D_i), in place
            if score_mod is not None:  # through score_mod back to the raw scaled scores
                (ds,) = torch.autograd.grad(s, raw, ds)
            dq[..., q0:q1, :].add_(ds @ k_w[..., k0:k1, :])  # times scale once, at the end
            dk_t[..., k0:k1].add_(q_scaled_t @ ds)  # dKᵀ += (Q scale)ᵀ dS
    return (
        dq.mul_(scale).sum_to_size(q.shape).to(q.dtype),
        dk_t.transpose(-2, -1).sum_to_size(k.shape).to(k.dtype),
        dv_t.transpose(-2, -1).sum_to_size(v.shape).to(v.dtype),
    )


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over two disjoint key sets, from each set's ``(out, lse)``; differentiable.

    ``lse = logaddexp(lse_a, lse_b)``; ``out = exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b``. A row
    with ``lse = -inf`` on one side takes the other side (whose ``out`` must be finite: zeros, as the
    kernels give); on both sides it stays ``(0, -inf)``, with zero gradients.

    Args:
        out_a, out_b: ``(..., T, E)``. lse_a, lse_b: ``(..., T)``.

    Returns:
        ``(out, lse)``: ``out`` in the dtype of ``out_a``, ``lse`` in the wider of the two lse dtypes.
    """
    neither = (lse_a == -math.inf) & (lse_b == -math.inf)  # logaddexp's gradient there is NaN: kept out of it
    lse = torch.where(neither, -math.inf, torch.logaddexp(lse_a.masked_fill(neither, 0), lse_b.masked_fill(neither, 0)))
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
    heads = math.prod(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]))
    block_q, block_k = tile_sizes(heads, sparse=isinstance(mask, MaskDescription), causal=causal)
    options = {"scale": scale, "mask": mask, "causal": causal, "score_mod": score_mod,
               "block_q": block_q, "block_k": block_k}  # fmt: skip
    return recompute_attention(query, key, value, forward=tiled_forward, backward=tiled_backward, options=options)


def tile_sizes(heads: int, *, sparse: bool = False, causal: bool = False) -> tuple[int, int]:
    """``(block_q, block_k)`` for ``heads`` (batch times heads) computed together: :data:`BLOCK_Q` by
    :data:`BLOCK_K`, the larger side halved while a tile of every head holds more than :data:`TILE_LIMIT`
    scores, down to 256 by 512.

    Smaller tiles skip more of the work a mask empties, so ``causal`` starts from 512 x 512 (at 4096 tokens
    with one head, forward+backward 97 ms; 2048 x 1024: 143 ms) and ``sparse`` (a mask description) takes
    256 x 512 (with 512 x 1024, sliding_window(256) and documents(16) were 1.26 and 1.64 times slower).

    >>> tile_sizes(1), tile_sizes(4), tile_sizes(64), tile_sizes(1, causal=True), tile_sizes(1, sparse=True)
    ((2048, 1024), (512, 1024), (256, 512), (512, 512), (256, 512))
    """
    block_q, block_k = (256, 512) if sparse else (512, 512) if causal else (BLOCK_Q, BLOCK_K)
    while block_q * block_k * heads > TILE_LIMIT and block_q * block_k > 256 * 512:
        if block_k > block_q:
            block_k //= 2
        else:
            block_q //= 2
    return block_q, block_k
