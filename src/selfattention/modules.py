"""Trainable attention modules, from the first W matrices to a production ``MultiHeadAttention``.

The ladder follows the well-known chapter-3 code, with constructor arguments in the same order so the
classes can be swapped in; every addition is keyword-only:

==========================  ==============================================================================
:class:`SelfAttentionV1`    ``W_query``, ``W_key``, ``W_value`` as ``(d_in, d_out)`` parameters
:class:`SelfAttention`      the same with ``nn.Linear`` layers (weights are the transposed matrices)
:class:`CausalAttention`    batched, causal mask, dropout on the weights in training
:class:`MultiHeadAttention` heads, grouped-query attention, padding masks, a KV cache
                            (:mod:`selfattention.kv_cache`), interop with ``torch.nn.MultiheadAttention``
                            (:mod:`selfattention.interop`), ring attention passed in as a strategy
                            (:mod:`selfattention.strategies`), and the fused kernel when it can
==========================  ==============================================================================

The modules hold weights and call :func:`selfattention.functional.attention`; the math lives there. Each
one scales the scores by ``1/sqrt(D)`` (``D`` the width of one head) unless given another ``scale``.

Backend choice (``backend="auto"``): the fused kernel (``"sdpa"``) unless the call needs the weights
(``return_weights=True``, or an active :func:`selfattention.capture` in training mode with dropout; other
captures keep the usual backend) or drops weights out in training mode (dropout is then applied to the
explicit weights by the ``"math"`` backend, so that it acts exactly on α as the reference does). Any other
name from :data:`selfattention.BACKENDS` forces that backend, except that a call needing the weights falls
back to ``"math"`` when the named backend cannot return them; so
``backend="sdpa"`` keeps the fused kernel, with its own dropout, in training too.

Masks: ``key_padding_mask`` is boolean with ``True`` = a real token that may be attended to, the package's
convention (``torch.nn.MultiheadAttention`` uses the opposite, ``True`` = ignore; :meth:`from_torch` and
:meth:`to_torch` convert the modules, not masks: pass ``~mask`` to PyTorch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattention import checks, interop
from selfattention.backends import BACKENDS, check_name
from selfattention.functional import attention, materialize_mask
from selfattention.kv_cache import KVCache
from selfattention.masks import MaskDescription
from selfattention.strategies import AttendStrategy, LocalAttention

if TYPE_CHECKING:
    from selfattention.distributed import ContextParallel

Rope = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]
"""A position hook: ``rope(query (B, H, T, D), key (B, G, T, D), start) -> (query, key)``, where ``start``
is the position of the first new token (the number of tokens already in the KV cache, else 0)."""

Recorder = Callable[..., None]


def _check_input(x: Tensor, d_in: int, context_length: int | None, cached: int = 0) -> None:
    """Raise for a non-float input, a width other than ``d_in`` or a sequence beyond ``context_length``."""
    checks.floating("input", x)
    if x.shape[-1] != d_in:
        raise ValueError(f"input width ({x.shape[-1]}) must equal d_in ({d_in}); input shape {tuple(x.shape)}")
    total = cached + x.shape[-2]
    if context_length is not None and total > context_length:
        where = f" ({cached} cached + {x.shape[-2]} new)" if cached else ""
        raise ValueError(f"{total} tokens{where} exceed context_length={context_length}")


class AttentionModule(nn.Module):
    """What every attention module here shares: the backend choice and the hook :func:`capture` uses.

    Subclasses project their input and call :meth:`attend`; they hold no attention math of their own.
    """

    def __init__(self, *, dropout: float = 0.0, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__()
        checks.dropout(dropout)
        checks.scale(scale)
        check_name(backend)
        self.dropout = float(dropout)
        self.backend = backend
        self.scale = scale
        self._recorder: Recorder | None = None  # set by selfattention.capture while it is active

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | MaskDescription | None = None,
        causal: bool = False,
        return_weights: bool = False,
        bounds: tuple[float, float, float] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention over ``query (..., H, T, D)``, ``key (..., G, S, D)``, ``value (..., G, S, E)``.

        Returns ``(context (..., H, T, E), weights (..., H, T, S) or None)``; the weights are computed
        (by an eager backend) only when asked for, or when :func:`capture` records this module with dropout
        active. Otherwise a capture keeps the usual backend and records each row's log-sum-exp beside the
        output, from which the weights are recomputed exactly on request (:mod:`selfattention.exact_weights`).
        ``bounds``: as for :func:`selfattention.attention`, when the caller checked the inputs already.
        """
        dropout_p = self.dropout if self.training else 0.0
        recorder = self._recorder
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(query.shape[-1])
        if recorder is None and not return_weights:
            context = attention(
                query,
                key,
                value,
                mask=mask,
                causal=causal,
                scale=self.scale,
                dropout_p=dropout_p,
                backend=self.backend,
                bounds=bounds,
            )
            return context, None
        if recorder is not None and not return_weights and dropout_p == 0:  # the usual backend, and its lse
            context, lse = attention(
                query,
                key,
                value,
                mask=mask,
                causal=causal,
                scale=self.scale,
                backend=self.backend,
                bounds=bounds,
                return_lse=True,
            )
            recorder(query, key, value, context, scale=scale, causal=causal, mask=mask, lse=lse, weights=None)
            return context, None
        if isinstance(mask, MaskDescription):  # the eager path records and returns tensors
            mask = materialize_mask(mask, query, key.shape[-2])
        eager = self.backend if self.backend in BACKENDS and BACKENDS[self.backend].returns_weights else "math"
        context, weights = attention(
            query,
            key,
            value,
            mask=mask,
            causal=causal,
            scale=self.scale,
            dropout_p=dropout_p,
            backend=eager,
            return_weights=True,
            bounds=bounds,
        )
        if recorder is not None:  # weights after dropout: only the eager path knows them
            recorder(query, key, value, context, scale=scale, causal=causal, mask=mask, lse=None, weights=weights)
        return context, weights


class SelfAttentionV1(AttentionModule):
    """Self-attention with plain parameter matrices: ``q = x W^Q``, ``k = x W^K``, ``v = x W^V``.

    ``W_query``, ``W_key``, ``W_value`` are ``nn.Parameter(torch.rand(d_in, d_out))``, created in that order,
    so that ``torch.manual_seed(123); SelfAttentionV1(3, 2)`` reproduces the chapter-3 numbers.

    Args:
        d_in: width of each input token. d_out: width of queries, keys, values and the output.

    Examples:
        >>> _ = torch.manual_seed(123)
        >>> from selfattention.examples import embeddings
        >>> [round(z, 4) for z in SelfAttentionV1(3, 2)(embeddings())[1].tolist()]
        [0.3061, 0.821]
    """

    def __init__(self, d_in: int, d_out: int, *, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., T, d_in)`` -> context vectors ``(..., T, d_out)``."""
        _check_input(x, self.d_in, None)
        # (..., T, d_in) @ (d_in, d_out) -> (..., T, d_out), then a head axis of 1: (..., 1, T, d_out)
        q, k, v = (x @ w for w in (self.W_query, self.W_key, self.W_value))
        context, _ = self.attend(q.unsqueeze(-3), k.unsqueeze(-3), v.unsqueeze(-3))
        return context.squeeze(-3)

    @torch.no_grad()
    def load_from(self, other: SelfAttention) -> None:
        """Copy the weights of a :class:`SelfAttention` (``W = linear.weight.T``); outputs then agree.

        Raises:
            ValueError: when ``other`` has biases (a V1 module has none) or other widths.
        """
        _check_copy(other, self.d_in, self.d_out)
        for name in ("W_query", "W_key", "W_value"):
            getattr(self, name).copy_(getattr(other, name).weight.T)


class SelfAttention(AttentionModule):
    """Self-attention with ``nn.Linear`` projections ``W_query``, ``W_key``, ``W_value`` (in that order).

    A Linear layer stores the transpose of V1's matrix: ``linear.weight == W.T``. To move weights either
    way, use :meth:`load_from` here or :meth:`SelfAttentionV1.load_from`; the outputs are then identical.

    Args:
        d_in: input width. d_out: output width. qkv_bias: give the three projections a bias.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False, *, backend: str = "auto") -> None:
        super().__init__(backend=backend)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., T, d_in)`` -> context vectors ``(..., T, d_out)``."""
        _check_input(x, self.d_in, None)
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)  # (..., T, d_in) -> (..., T, d_out)
        context, _ = self.attend(q.unsqueeze(-3), k.unsqueeze(-3), v.unsqueeze(-3))
        return context.squeeze(-3)

    @torch.no_grad()
    def load_from(self, other: SelfAttentionV1) -> None:
        """Copy the matrices of a :class:`SelfAttentionV1` (``linear.weight = W.T``; biases set to zero)."""
        if (other.d_in, other.d_out) != (self.d_in, self.d_out):
            raise ValueError(
                f"cannot copy a ({other.d_in}, {other.d_out}) module into a ({self.d_in}, {self.d_out}) one"
            )
        for name in ("W_query", "W_key", "W_value"):
            linear = getattr(self, name)
            linear.weight.copy_(getattr(other, name).T)
            if linear.bias is not None:
                linear.bias.zero_()


def _check_copy(other: SelfAttention, d_in: int, d_out: int) -> None:
    if (other.d_in, other.d_out) != (d_in, d_out):
        raise ValueError(f"cannot copy a ({other.d_in}, {other.d_out}) module into a ({d_in}, {d_out}) one")
    if other.W_query.bias is not None:
        raise ValueError("SelfAttentionV1 has no biases; copy from a SelfAttention with qkv_bias=False")


class CausalAttention(AttentionModule):
    """Single-head causal self-attention with dropout on the attention weights (in training mode only).

    Args:
        d_in: input width. d_out: output width.
        context_length: the longest sequence accepted (``None``: no limit).
        dropout: probability of dropping an attention weight in training, in [0, 1).
        qkv_bias: give the projections a bias.
        backend: see the module docstring.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int | None,
        dropout: float,
        qkv_bias: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(dropout=dropout, backend=backend)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, T, d_in)`` or ``(T, d_in)`` -> ``(B, T, d_out)`` or ``(T, d_out)``; token t sees t' <= t."""
        _check_input(x, self.d_in, self.context_length)
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)  # (..., T, d_in) -> (..., T, d_out)
        context, _ = self.attend(q.unsqueeze(-3), k.unsqueeze(-3), v.unsqueeze(-3), causal=True)
        return context.squeeze(-3)


class MultiHeadAttention(AttentionModule):
    """Multi-head self-attention with grouped-query heads, padding masks, a KV cache and PyTorch interop.

    ``W_query``, ``W_key``, ``W_value`` and ``out_proj`` are ``nn.Linear`` layers created in that order (as in
    the chapter-3 class). ``d_out`` is split into ``num_heads`` heads of width ``D = d_out // num_heads``;
    keys and values have ``num_kv_heads`` heads (``W_key``, ``W_value``: ``d_in -> num_kv_heads * D``), and
    query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``.

    Args:
        d_in: input width. d_out: output width, split into heads.
        context_length: the longest sequence accepted (cached + new tokens); ``None``: no limit.
        dropout: probability of dropping an attention weight in training, in [0, 1).
        num_heads: query heads ``H``. qkv_bias: give ``W_query``, ``W_key``, ``W_value`` a bias.
        num_kv_heads: key/value heads ``G`` (``None``: ``H``; 1: multi-query attention).
        causal: each token attends only to itself and earlier tokens (bottom-right aligned with a cache).
        backend: ``"auto"`` or a name from :data:`selfattention.BACKENDS` (see the module docstring).
        scale: multiplies the scores; ``None`` means ``1/sqrt(D)``.
        out_bias: give ``out_proj`` a bias (``True`` as in the chapter-3 class).
        context_parallel: a :class:`selfattention.distributed.ContextParallel`: each rank passes its own
            slice of the tokens and attention runs as ring attention across the ranks. It becomes
            :attr:`strategy` (default :class:`selfattention.strategies.LocalAttention`), which the module
            calls to check the call and to attend, without branching on where attention runs.
        device, dtype: where and how the parameters are created.

    Raises:
        ValueError: ``d_out`` not divisible by ``num_heads``, ``num_heads`` not divisible by
            ``num_kv_heads``, dropout outside [0, 1), or an unknown backend.

    >>> mha = MultiHeadAttention(8, 8, context_length=16, dropout=0.0, num_heads=2)
    >>> mha(torch.randn(3, 5, 8)).shape, mha(torch.randn(5, 8)).shape
    (torch.Size([3, 5, 8]), torch.Size([5, 8]))
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int | None,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        num_kv_heads: int | None = None,
        causal: bool = True,
        backend: str = "auto",
        scale: float | None = None,
        out_bias: bool = True,
        context_parallel: ContextParallel | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dropout=dropout, backend=backend, scale=scale)
        if num_heads < 1 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if context_length is not None and context_length < 1:
            raise ValueError(f"context_length must be at least 1 or None, got {context_length}")
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, d_out // num_heads
        self.causal = causal
        self.strategy: AttendStrategy = context_parallel if context_parallel is not None else LocalAttention()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        kv_width = num_kv_heads * self.head_dim
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias, **factory)
        self.W_key = nn.Linear(d_in, kv_width, bias=qkv_bias, **factory)
        self.W_value = nn.Linear(d_in, kv_width, bias=qkv_bias, **factory)
        self.out_proj = nn.Linear(d_out, d_out, bias=out_bias, **factory)

    def extra_repr(self) -> str:
        """The settings shown by ``print(module)`` besides the layers."""
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"context_length={self.context_length}, dropout={self.dropout}, causal={self.causal}, "
            f"backend={self.backend!r}"
        )

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | MaskDescription | None = None,
        kv_cache: KVCache | None = None,
        rope: Rope | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over ``x (B, T, d_in)`` or unbatched ``(T, d_in)``; returns ``(B, T, d_out)`` / ``(T, d_out)``.

        Args:
            x: the input tokens.
            key_padding_mask: boolean ``(B, S)`` (or ``(S,)`` for unbatched input), ``True`` = a real token
                that may be attended to, ``False`` = padding (``torch.nn.MultiheadAttention``: the opposite).
                ``S`` counts every key: cached plus new.
            attn_mask: a further mask, ``True`` = may attend (both it and the padding mask must allow): a
                boolean tensor broadcastable to ``(B, H, T, S)``, or a mask description from
                :mod:`selfattention.masks`, which ``backend="auto"`` runs block-sparse when it is the only mask.
            kv_cache: a :class:`KVCache` (see :meth:`make_kv_cache`); the new keys and values are appended and
                the queries attend to all of them. Use under ``torch.no_grad()``.
            rope: a position hook applied to the new queries and keys before caching (see :data:`Rope`); a
                rolling cache with RoPE tables rotates them itself (:class:`selfattention.kv_cache.RollingKVCache`).
            return_weights: also return the attention weights α ``(B, H, T, S)`` (eager backend).

        Returns:
            The output, or ``(output, weights)`` with ``return_weights=True``.

        Raises:
            ValueError: wrong input width, too many tokens for ``context_length``, a bad mask shape.
            TypeError: a non-float input or a non-boolean mask.
        """
        self.strategy.check_call(
            dropout=self.dropout if self.training else 0.0,
            unsupported={
                "kv_cache": kv_cache,
                "key_padding_mask": key_padding_mask,
                "attn_mask": attn_mask,
                "rope": rope,
                "return_weights": return_weights,
                "capture": self._recorder,
            },
        )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)  # (T, d_in) -> (1, T, d_in)
        elif x.dim() != 3:
            raise ValueError(f"input must be (B, T, d_in) or (T, d_in), got shape {tuple(x.shape)}")
        cached = kv_cache.length if kv_cache is not None else 0
        _check_input(x, self.d_in, self.context_length, cached)
        batch, num_tokens, _ = x.shape
        heads, kv_heads, width = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self._project(x)
        # (B, T, H * D) -> (B, T, H, D) -> (B, H, T, D); keys and values with G heads
        q = q.view(batch, num_tokens, heads, width).transpose(1, 2)
        k = k.view(batch, num_tokens, kv_heads, width).transpose(1, 2)
        v = v.view(batch, num_tokens, kv_heads, width).transpose(1, 2)
        if rope is not None and (kv_cache is None or kv_cache.rotary is None):
            q, k = rope(q, k, cached)
        # Everything that can refuse this call is checked before the cache is written: a refused call must
        # leave the cache as it was (its length and its keys/values up to that length).
        num_keys = cached + num_tokens if kv_cache is None else kv_cache.length_after(num_tokens)
        mask = self._padding_mask(key_padding_mask, batch, num_keys, unbatched)
        if attn_mask is not None:
            checks.mask(attn_mask, (heads, num_tokens, num_keys) if unbatched else (batch, heads, num_tokens, num_keys))
        largest_query, largest_key, largest_value = checks.largest_finite(query=q, key=k, value=v)
        bounds = (largest_query, largest_key, largest_value)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, largest=(largest_key, largest_value))  # (B, G, S, D), S = cached + T
            q = kv_cache.rotate_queries(q)  # a rolling cache rotates by the place in the cache (kv_cache.py)
            bounds = kv_cache.bounds(largest_query)  # what was written was checked: attention need not rescan
        try:
            context, weights = self._attend_all(q, k, v, mask, attn_mask, unbatched, return_weights, bounds)
        except Exception:
            if kv_cache is not None:  # refused late (e.g. the scores overflowed): forget what was written
                kv_cache.undo(num_tokens)
            raise
        if unbatched:
            context = context.unsqueeze(0)
        # (B, H, T, D) -> (B, T, H, D) -> (B, T, d_out)
        out = self.out_proj(context.transpose(1, 2).reshape(batch, num_tokens, self.d_out))
        if unbatched:
            out = out[0]
        if return_weights:
            assert weights is not None
            return out, weights
        return out

    def _attend_all(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        attn_mask: Tensor | MaskDescription | None,
        unbatched: bool,
        return_weights: bool,
        bounds: tuple[float, float, float] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``q (B, H, T, D)`` over ``k, v (B, G, S, D)`` with the masks, by :attr:`strategy`.

        ``bounds``: ``max |q|, |k|, |v|`` already checked by :meth:`forward` (see :func:`selfattention.attention`).
        Returns ``(B, H, T, D)`` (``(H, T, D)`` when ``unbatched``) and the weights or ``None``.
        """
        if unbatched:
            q, k, v = q[0], k[0], v[0]
            mask = None if mask is None else mask[0]
        combined = _with_attn_mask(mask, attn_mask, q, k.shape[-2])
        return self.strategy.attend(
            self, q, k, v, mask=combined, causal=self.causal, return_weights=return_weights, bounds=bounds
        )

    def _project(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x W_query``, ``x W_key``, ``x W_value`` as one matrix product with the three weights stacked.

        The same numbers as three products; one larger product (and one in the backward pass) is faster on
        CPU (``benchmarks/mha.py`` measures the module as a whole).

        Returns ``(B, T, H * D)``, ``(B, T, G * D)``, ``(B, T, G * D)``.
        """
        linears = (self.W_query, self.W_key, self.W_value)
        weight = torch.cat([linear.weight for linear in linears])  # (d_out + 2 G D, d_in)
        bias = None if self.W_query.bias is None else torch.cat([linear.bias for linear in linears])
        kv_width = self.num_kv_heads * self.head_dim
        return F.linear(x, weight, bias).split([self.d_out, kv_width, kv_width], dim=-1)

    def _padding_mask(self, mask: Tensor | None, batch: int, num_keys: int, unbatched: bool) -> Tensor | None:
        """``key_padding_mask (B, S)`` -> ``(B, 1, 1, S)``, checked."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"key_padding_mask must be a boolean tensor (True = may attend), got {kind}")
        if unbatched and mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != (batch, num_keys):
            raise ValueError(
                f"key_padding_mask of shape {tuple(mask.shape)} must be (batch, keys) = ({batch}, {num_keys})"
            )
        return mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S): every head and query

    def make_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A :class:`KVCache` for this module: ``(batch_size, num_kv_heads, max_len, head_dim)`` buffers.

        ``max_len`` defaults to ``context_length``; dtype and device default to those of the weights.
        """
        max_len = max_len if max_len is not None else self.context_length
        if max_len is None:
            raise ValueError("max_len is required when the module has no context_length")
        weight = self.W_key.weight
        return KVCache(
            batch_size,
            self.num_kv_heads,
            max_len,
            self.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    @classmethod
    def from_torch(
        cls,
        module: nn.MultiheadAttention,
        *,
        causal: bool = False,
        context_length: int | None = None,
        backend: str = "auto",
    ) -> MultiHeadAttention:
        """A module with the weights of ``torch.nn.MultiheadAttention`` (copied): :func:`interop.from_torch`.

        Not causal by default, as PyTorch's module; it takes ``(B, T, C)`` and a ``key_padding_mask`` with
        ``True`` = may attend (pass ``~mask`` from PyTorch).

        Raises:
            ValueError: ``kdim``/``vdim`` other than ``embed_dim``, ``add_bias_kv`` or ``add_zero_attn``.
        """
        return interop.from_torch(module, cls, causal=causal, context_length=context_length, backend=backend)

    def to_torch(self) -> nn.MultiheadAttention:
        """A ``torch.nn.MultiheadAttention(batch_first=True)`` with these weights: :func:`interop.to_torch`.

        Raises:
            ValueError: ``d_in != d_out``, ``num_kv_heads != num_heads``, or a custom ``scale``.
        """
        return interop.to_torch(self)


def _with_attn_mask(
    padding: Tensor | None, extra: Tensor | MaskDescription | None, query: Tensor, num_keys: int
) -> Tensor | MaskDescription | None:
    """The padding mask and ``attn_mask`` together; a description alone stays a description (block-sparse)."""
    if extra is None or padding is None:
        return extra if padding is None else padding
    checks.mask(extra, (*query.shape[:-1], num_keys))
    if isinstance(extra, MaskDescription):
        extra = materialize_mask(extra, query, num_keys)
    if extra.dtype == torch.bool:
        return padding & extra
    return extra.masked_fill(~padding, -math.inf)  # a float mask is added; padding forbids
