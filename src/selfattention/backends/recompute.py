"""The autograd Function of the backends that recompute attention in the backward pass (FlashAttention-2).

``"tiled"`` and ``"blocksparse"`` both keep only the output and each row's log-sum-exp from the forward
pass, and recompute the weights tile by tile from them in the backward pass: memory ``O(T + S)`` instead of
the ``O(T·S)`` of the weights autograd would otherwise store. They differ only in the two kernels, which
this Function is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Forward = Callable[..., tuple[Tensor, Tensor]]
"""``forward(q, k, v, **options) -> (out (..., T, E), lse (..., T))``."""
Backward = Callable[..., tuple[Tensor, Tensor, Tensor]]
"""``backward(q, k, v, out, lse, grad_out, **options) -> (dq, dk, dv)``."""


class _RecomputeAttention(torch.autograd.Function):
    """Saves q, k, v, out and lse; the backward kernel recomputes everything else."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, kernels: tuple[Forward, Backward], options: dict
    ) -> tuple[Tensor, Tensor]:
        out, lse = kernels[0](q, k, v, **options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backward_kernel, ctx.options = kernels[1], options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable  # the kernels compute first derivatives only: a second one is refused, not wrong
    def backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward_kernel(q, k, v, out, lse, grad_out, **ctx.options)
        return dq, dk, dv, None, None


def recompute_attention(
    q: Tensor, k: Tensor, v: Tensor, *, forward: Forward, backward: Backward, options: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """``forward(q, k, v, **options)``'s output, differentiable through ``backward`` (given the saved lse),
    and that lse (not differentiable: :func:`selfattention.capture` records it).

    Args:
        q: ``(..., T, D)``; k: ``(..., S, D)``; v: ``(..., S, E)``.
        forward: returns ``(out, lse)``.
        backward: returns ``(dq, dk, dv)`` from ``q, k, v, out, lse, grad_out`` and the same ``options``.
        options: keyword arguments of both kernels (scale, mask, causal, tile sizes...).

    Returns:
        ``(out (..., T, E), lse (..., T))``.
    """
    return _RecomputeAttention.apply(q, k, v, (forward, backward), options)
