"""Attention that also reports each row's log-sum-exp, for :func:`selfattention.capture`.

For a query row ``i`` the log-sum-exp is ``lse_i = log Σ_j exp(scale · q_i · k_j + mask_ij)`` (``-inf`` for
a row with no allowed key). With it any weight is exact without the rest of the row:
``α_ij = exp(scale · q_i · k_j + mask_ij - lse_i)`` (:mod:`selfattention.exact_weights`). The fused kernels
compute it anyway and drop it:

* ``"sdpa"`` on the CPU: :func:`sdpa_with_lse` calls the kernel behind
  :func:`torch.nn.functional.scaled_dot_product_attention`,
  ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``, which returns ``(output, logsumexp)``; the
  output and its gradient are the fused kernel's.
* ``"tiled"`` and ``"blocksparse"``: their forward kernels return it (:mod:`selfattention.backends.recompute`).
* anything else (``"math"``, ``"loop"``, another device): the backend runs as usual and :func:`row_logsumexp`
  computes the log-sum-exp beside it, row chunk by row chunk (one more pass over the scores).

Every function here has the backend signature without ``dropout_p`` and ``return_weights`` and returns
``(context (..., T, E), lse (..., T))``; lse is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from selfattention import checks
from selfattention.backends import blocksparse, sdpa
from selfattention.backends.math import combined_mask
from selfattention.exact_weights import masked_scores
from selfattention.masks import MaskDescription

CHUNK_ELEMENTS = 1 << 22
"""Scores computed at once by :func:`row_logsumexp` (16 MiB in float32), whatever the sequence length."""


def _flash_eligible(query: Tensor, key: Tensor, value: Tensor, mask: Any) -> bool:
    """Whether the CPU flash kernel takes these inputs as they are: 3-D or 4-D, equal leading dims, one head
    width for queries, keys and values (it refuses values of another width), a tensor mask."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and query.dim() in (3, 4)
        and query.shape[:-2] == key.shape[:-2]
        and not isinstance(mask, MaskDescription)
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
    )


def sdpa_with_lse(
    query: Tensor, key: Tensor, value: Tensor, *, mask: Tensor | None, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """The ``"sdpa"`` backend's context with its log-sum-exp, from the CPU flash kernel where it applies.

    The masks are treated as :mod:`selfattention.backends.sdpa` treats them (bottom-right causal, fully
    masked rows give zeros, and their lse is ``-inf``); elsewhere this falls back to the ``"sdpa"`` backend
    plus :func:`row_logsumexp`.
    """
    if not _flash_eligible(query, key, value, mask):
        context, _ = sdpa.attention(
            query, key, value, mask=mask, causal=causal, scale=scale, dropout_p=0.0, return_weights=False
        )
        return context, row_logsumexp(query, key, scale=scale, causal=causal, mask=mask)
    unbatched = query.dim() == 3
    if unbatched:  # (H, T, D) -> (1, H, T, D): the kernel takes 4-D inputs
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    row_ok: Tensor | None = None
    if mask is None and (not causal or num_queries == num_keys):
        context, lse = flash(query, key, value, 0.0, causal and num_queries > 0, scale=scale)
    else:
        full = combined_mask(mask, causal, num_queries, num_keys, query.device)
        assert full is not None
        full = full.reshape((1,) * (4 - full.dim()) + tuple(full.shape))  # broadcasts to (B, H, T, S)
        if full.dtype == torch.bool:
            row_ok = full.any(dim=-1, keepdim=True)  # (..., T, 1): rows with at least one key
            additive = torch.zeros(full.shape, dtype=query.dtype, device=query.device)
            additive = additive.masked_fill(~(full | ~row_ok), -math.inf)
        else:
            row_ok = (full > -math.inf).any(dim=-1, keepdim=True)
            additive = torch.where(row_ok, full, torch.zeros_like(full)).to(query.dtype)
        context, lse = flash(query, key, value, 0.0, False, attn_mask=additive, scale=scale)
    lse = lse.to(checks.work_dtype(query.dtype))
    if row_ok is not None and not bool(row_ok.all()):
        context = context * row_ok.to(context.dtype)
        lse = torch.where(row_ok[..., 0].expand_as(lse), lse, -math.inf)
    if unbatched:
        context, lse = context[0], lse[0]
    return context, lse


def blocksparse_with_lse(
    query: Tensor, key: Tensor, value: Tensor, *, mask: Any, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """The ``"blocksparse"`` backend's context and the merged lse of its runs (on a GPU: FlexAttention's
    output, with :func:`row_logsumexp` beside it)."""
    if query.device.type != "cpu":
        return with_row_logsumexp(blocksparse.attention)(query, key, value, mask=mask, causal=causal, scale=scale)
    return blocksparse.attention_with_lse(query, key, value, mask=mask, causal=causal, scale=scale)


def with_row_logsumexp(fn: Any) -> Any:
    """A backend with the log-sum-exp computed beside it by :func:`row_logsumexp` (for ``"math"``, ``"loop"``)."""

    def run(
        query: Tensor, key: Tensor, value: Tensor, *, mask: Any, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        context, _ = fn(query, key, value, mask=mask, causal=causal, scale=scale, dropout_p=0.0, return_weights=False)
        return context, row_logsumexp(query, key, scale=scale, causal=causal, mask=mask)

    return run


def row_logsumexp(query: Tensor, key: Tensor, *, scale: float, causal: bool, mask: Any) -> Tensor:
    """``lse (..., T)`` of ``query (..., T, D)`` against ``key (..., S, D)``, in row chunks of bounded size.

    This is the plain definition, ``logsumexp_j(scale · q_i · k_j + mask_ij)``, with ``-inf`` for a row whose
    keys are all masked; the fused kernels' log-sum-exps are tested against it.

    >>> q = torch.zeros(2, 3)
    >>> row_logsumexp(q, q, scale=1.0, causal=True, mask=None).exp()
    tensor([1., 2.])
    """
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    lse = torch.full((*lead, num_queries), -math.inf, dtype=checks.work_dtype(query.dtype), device=query.device)
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(lead) * num_keys))
    for r0 in range(0, num_queries, step):
        r1 = min(num_queries, r0 + step)
        scores = masked_scores(query, key, scale=scale, causal=causal, mask=mask, rows=(r0, r1))
        lse[..., r0:r1] = torch.logsumexp(scores, dim=-1)
    return lse
