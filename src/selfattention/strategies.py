"""How :class:`~selfattention.modules.MultiHeadAttention` runs attention once it has its queries, keys, values.

The module is given a strategy and calls it; it does not branch on where attention runs:

======================================================  ===============================================
:class:`LocalAttention` (the default)                    :meth:`AttentionModule.attend` in this process:
                                                         the backend choice, masks, weights, capture
:class:`selfattention.distributed.ContextParallel`       ring attention over the ranks of a process group,
                                                         each holding its own slice of the tokens
======================================================  ===============================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from selfattention.masks import MaskDescription
    from selfattention.modules import AttentionModule


class AttendStrategy(Protocol):
    """What a strategy provides: a check of the call, then attention itself."""

    def check_call(self, *, dropout: float, unsupported: dict[str, object]) -> None:
        """Raise ValueError, before anything is computed or cached, for what this strategy cannot do.

        ``dropout``: the probability in effect (0 in eval mode); ``unsupported``: the call's optional
        features by name (``kv_cache``, ``key_padding_mask``, ...), ``None`` or ``False`` when unused.
        """
        ...

    def attend(
        self,
        module: AttentionModule,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | MaskDescription | None,
        causal: bool,
        return_weights: bool,
        bounds: tuple[float, float, float] | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``query (..., H, T, D)`` over ``key (..., G, S, D)``, ``value (..., G, S, E)`` for ``module``.

        Returns ``(context (..., H, T, E), weights (..., H, T, S) or None)``. ``causal`` is bottom-right
        aligned over the whole sequence; ``bounds`` as for :func:`selfattention.attention`.
        """
        ...


class LocalAttention:
    """Attention in this process: :meth:`AttentionModule.attend` with the module's backend and capture."""

    def check_call(self, *, dropout: float, unsupported: dict[str, object]) -> None:
        """Accept every call: the module's own checks apply."""

    def attend(
        self,
        module: AttentionModule,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | MaskDescription | None,
        causal: bool,
        return_weights: bool,
        bounds: tuple[float, float, float] | None,
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`AttentionModule.attend`; a single query with a causal mask needs no mask at all."""
        # Bottom-right causal with a single query is no mask at all: skip building one while decoding.
        causal = causal and query.shape[-2] > 1
        return module.attend(query, key, value, mask=mask, causal=causal, return_weights=return_weights, bounds=bounds)

    def __repr__(self) -> str:
        return "LocalAttention()"
