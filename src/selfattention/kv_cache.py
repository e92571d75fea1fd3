"""Key/value caches for step-by-step decoding: the full cache, and rolling caches that evict (window, sinks).

Three policies, named as ``generate --cache`` names them (:class:`CachePolicy`):

=========  ===========================================================================================
``full``   :class:`KVCache`: every token is kept until ``max_len``; past it the caller must refill
``window`` :class:`RollingKVCache` with ``sinks=0``: the last ``window`` tokens; the oldest is dropped
``sinks``  :class:`RollingKVCache`: the first ``sinks`` tokens of the stream (default 4) plus the last
           ``window`` tokens (StreamingLLM, Xiao et al., 2023: "Efficient Streaming Language Models with
           Attention Sinks")
=========  ===========================================================================================

Positions. A rolling cache for a rotary model is given the model's RoPE tables (``rotary=(cos, sin)``) and
then keeps its keys *before* the rotation: at every step it rotates each kept key by its index inside the
cache (``0 .. S - 1``, sinks first) and the new queries by theirs, as StreamingLLM does. So one attention call
over a rolling cache computes exactly what attention computes over the kept tokens alone, placed at positions
``0 .. S - 1`` (the tests check this). Keys stored already rotated, at the positions they had when they entered,
would drift apart from the queries once tokens are evicted: that is the bug this scheme avoids.

What it does not promise: in a model of several layers, the keys and values of a kept token in the second
layer and above were computed while the evicted tokens were still visible, so streaming is not the same as
running the whole model again over the kept tokens (that recomputation is the baseline that
``benchmarks/streaming.py`` measures).

Learned absolute positions (our :class:`selfattention.GPT` without ``rope``) cannot use a rolling cache. The
position is added to the token embedding before the first layer, so every cached key and value, in every
layer, depends on the position its token had when it was computed; it cannot be moved to another place in
the cache without recomputing the token. Keeping absolute positions works only until ``context_length``
tokens (there is no learned embedding for the next position), which is no further than the full cache goes.
:func:`selfattention.generate.make_caches` therefore refuses ``window`` and ``sinks`` for such a model; past
the context it can only recompute (the full cache's refill).

Use the caches under ``torch.no_grad()`` (the buffers are written in place).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattention import checks

POLICIES = ("full", "window", "sinks")
"""The cache policies, in the order ``generate --cache`` lists them."""


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the "rotate half" layout: ``x cos + (-x2, x1) sin`` for ``x = (x1, x2)`` split on the last axis.

    ``cos`` and ``sin`` broadcast against ``x (..., T, D)``, usually ``(T, D)`` rows of a table.
    """
    half = x.shape[-1] // 2
    rotated = x * cos
    if sin.shape != cos.shape:  # a sin table wider than x * cos: the in-place sums below need the full shape
        shape = torch.broadcast_shapes(rotated.shape, sin.shape)  # (slow in Python: not for equal tables)
        if rotated.shape != shape:
            rotated = rotated.expand(shape).clone()
    # The same sums as ``x * cos + cat([-x2, x1]) * sin``, bit for bit, written into the halves of one
    # product instead of building the rotated copy with a negation and a concatenation (a third faster).
    rotated[..., :half].sub_(x[..., half:] * sin[..., :half])
    rotated[..., half:].add_(x[..., :half] * sin[..., half:])
    return rotated


class KVCache:
    """Preallocated keys and values for step-by-step decoding, ``(B, G, max_len, D)`` each.

    :meth:`update` writes the new keys/values after the cached ones and returns all of them so far. Use it
    under ``torch.no_grad()`` (the buffers are written in place).

    >>> cache = KVCache(1, 2, 8, 4)
    >>> k_all, v_all = cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    >>> k_all.shape, cache.length
    (torch.Size([1, 2, 3, 4]), 3)
    """

    rotary: tuple[Tensor, Tensor] | None = None
    """RoPE tables when the cache itself places keys and queries (rolling caches); ``None`` here."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self._largest = (0.0, 0.0)  # max |key|, max |value| of everything written since the last reset

    @property
    def max_len(self) -> int:
        """How many positions the cache holds."""
        return self.keys.shape[2]

    def update(
        self, key: Tensor, value: Tensor, *, largest: tuple[float, float] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Append ``key``, ``value`` ``(B, G, T, D)``; return all keys and values so far, ``(B, G, S, D)``.

        ``largest``: ``(max |key|, max |value|)`` when the caller has measured them already (and so checked
        that they are finite, as :class:`selfattention.MultiHeadAttention` does); otherwise they are measured
        here.

        Raises:
            ValueError: when the shapes do not match the cache, or the cache would overflow.
        """
        batch, heads, _, width = self.keys.shape
        new = key.shape[-2]
        for name, tensor in (("key", key), ("value", value)):
            if tensor.dim() != 4 or (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (
                batch,
                heads,
                width,
            ):
                raise ValueError(
                    f"{name} of shape {tuple(tensor.shape)} does not fit a cache of shape "
                    f"{tuple(self.keys.shape)} (batch, kv heads, max_len, head width)"
                )
        if self.length + new > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {new} new positions exceed max_len={self.max_len}"
            )
        largest_key, largest_value = largest if largest is not None else checks.largest_finite(key=key, value=value)
        fits = torch.finfo(self.keys.dtype).max
        if max(largest_key, largest_value) > fits:
            raise ValueError(
                f"keys up to {largest_key:.3g} and values up to {largest_value:.3g} do not fit a cache of "
                f"{self.keys.dtype} (largest {fits:.3g})"
            )
        end = self.length + new
        # narrow() and copy_(): the same writes as slice assignment, in a fifth of its time for a decoding step
        self.keys.narrow(2, self.length, new).copy_(key)
        self.values.narrow(2, self.length, new).copy_(value)
        self._largest = (max(self._largest[0], largest_key), max(self._largest[1], largest_value))
        self.length = end
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def rotate_queries(self, query: Tensor) -> Tensor:
        """The new queries ``(B, H, T, D)`` as attention should see them: unchanged (see :class:`RollingKVCache`)."""
        return query

    def bounds(self, largest_query: float) -> tuple[float, float, float]:
        """Upper bounds on ``max |q|``, ``max |k|``, ``max |v|`` of what attention reads after :meth:`update`.

        ``largest_query`` is ``max |q|`` of the new queries before :meth:`rotate_queries`. Every key and value
        was checked finite when it was written, and the cache keeps the largest it has seen (tokens since
        evicted or undone included, so the bounds may be loose, never too small): attention need not scan
        the whole cache again at every decoding step (:func:`selfattention.attention`'s ``bounds``).
        Rotation by RoPE mixes pairs of entries, ``|x1 cos - x2 sin| <= sqrt(2) max(|x1|, |x2|)``, so
        rotated queries and keys are bounded by ``sqrt(2)`` times the unrotated ones.
        """
        growth = 1.0 if self.rotary is None else math.sqrt(2.0)
        return largest_query * growth, self._largest[0] * growth, self._largest[1]

    def length_after(self, num_new: int) -> int:
        """How many positions :meth:`update` with ``num_new`` new ones will return (the keys attended to)."""
        return self.length + num_new

    def undo(self, num_new: int) -> None:
        """Forget the ``num_new`` positions the last :meth:`update` appended (a call refused after writing)."""
        self.length -= num_new

    def reset(self) -> None:
        """Forget the cached positions (the buffers are kept and overwritten)."""
        self.length = 0
        self._largest = (0.0, 0.0)


class RollingKVCache(KVCache):
    """A KV cache of constant size that evicts: the first ``sinks`` tokens plus the last ``window`` ones.

    ``sinks=0`` is the plain rolling window. Before new tokens are written, the oldest tokens after the sinks
    are dropped to make room (:meth:`make_room`); the kept ones move down, so the buffer is always in stream
    order: sinks, then the window. :attr:`seen` counts every token ever appended, and :meth:`kept` says which
    of them the cache holds.

    With ``rotary=(cos, sin)`` (the model's RoPE tables, ``(L, D)`` each with ``L >= sinks + window``, "rotate
    half" layout) the cache stores keys *unrotated*; :meth:`update` returns them rotated by their index inside
    the cache and :meth:`rotate_queries` rotates the new queries likewise (see the module docstring). The
    attention module must then not rotate the keys itself: :class:`selfattention.MultiHeadAttention` leaves
    both rotations to a cache whose :attr:`rotary` is set.

    Args:
        batch_size, num_kv_heads, head_dim: as for :class:`KVCache`.
        window: how many of the latest tokens are kept (at least 1).
        sinks: how many of the first tokens are kept for good (0 for a plain window).
        rotary: the RoPE ``(cos, sin)`` tables of a rotary model, or ``None``.
        dtype, device: of the buffers.

    Raises:
        ValueError: a window below 1, negative sinks, or tables that are too short or of another width.

    >>> cache = RollingKVCache(1, 1, 1, window=3, sinks=1)
    >>> for t in range(6):
    ...     _ = cache.update(torch.full((1, 1, 1, 1), float(t)), torch.zeros(1, 1, 1, 1))
    >>> cache.kept(), cache.keys.flatten().tolist()
    ([0, 3, 4, 5], [0.0, 3.0, 4.0, 5.0])
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        window: int,
        sinks: int = 0,
        rotary: tuple[Tensor, Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if sinks < 0:
            raise ValueError(f"sinks must be at least 0, got {sinks}")
        super().__init__(batch_size, num_kv_heads, sinks + window, head_dim, dtype=dtype, device=device)
        if rotary is not None:
            cos, sin = rotary
            if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim or cos.shape[0] < sinks + window:
                raise ValueError(
                    f"rotary tables of shapes {tuple(cos.shape)} and {tuple(sin.shape)} must both be "
                    f"(positions >= {sinks + window}, head width {head_dim})"
                )
        self.window, self.sinks, self.rotary = window, sinks, rotary
        self.seen = 0

    def make_room(self, num_new: int) -> None:
        """Evict the oldest tokens after the sinks so that ``num_new`` more fit.

        Called by :meth:`update`; a model that reads :attr:`length` to place new tokens (as
        :func:`selfattention.generate.generate` arranges) calls it first, so that :attr:`length` is then the
        index inside the cache of the first new token.

        Raises:
            ValueError: when ``num_new`` tokens cannot fit even after evicting all but the sinks.
        """
        overflow = self.length + num_new - self.max_len
        if overflow <= 0:
            return
        first = min(self.sinks, self.length)  # the sinks stay where they are
        if overflow > self.length - first:
            raise ValueError(
                f"{num_new} new tokens do not fit a cache of {self.sinks} sinks + a window of {self.window} "
                f"({first} sinks cached); feed at most {self.max_len - first} at a time"
            )
        end = self.length - overflow
        for buffer in (self.keys, self.values):  # (B, G, S, D): move the kept window down, over the evicted
            buffer[:, :, first:end] = buffer[:, :, first + overflow : self.length].clone()
        self.length = end

    def update(
        self, key: Tensor, value: Tensor, *, largest: tuple[float, float] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Evict as needed, append ``key``, ``value`` ``(B, G, T, D)``, and return the kept ``(B, G, S, D)``.

        With :attr:`rotary` set, ``key`` must be unrotated and the returned keys are rotated by their index
        inside the cache.
        """
        self.make_room(key.shape[-2])
        keys, values = super().update(key, value, largest=largest)
        self.seen += key.shape[-2]
        if self.rotary is None:
            return keys, values
        cos, sin = (table[: self.length].to(keys.dtype) for table in self.rotary)  # (S, D)
        return rotate_half(keys, cos, sin), values

    def rotate_queries(self, query: Tensor) -> Tensor:
        """The newest ``T`` queries ``(B, H, T, D)`` rotated by their index inside the cache: ``S - T .. S - 1``.

        Unchanged without :attr:`rotary`. Call after :meth:`update`.
        """
        if self.rotary is None:
            return query
        start = self.length - query.shape[-2]
        cos, sin = (table[start : self.length].to(query.dtype) for table in self.rotary)  # (T, D)
        return rotate_half(query, cos, sin)

    def length_after(self, num_new: int) -> int:
        """How many positions :meth:`update` will return: at most :attr:`max_len`, the oldest evicted."""
        return min(self.length + num_new, self.max_len)

    def undo(self, num_new: int) -> None:
        """Forget the ``num_new`` positions the last :meth:`update` appended.

        Tokens that update evicted to make room stay evicted: a rolling cache forgets them for good.
        """
        super().undo(num_new)
        self.seen -= num_new

    def kept(self) -> list[int]:
        """The stream indices (``0 .. seen - 1``) of the tokens in the cache, in cache order."""
        first = min(self.sinks, self.length)
        return [*range(first), *range(self.seen - (self.length - first), self.seen)]

    def reset(self) -> None:
        """Forget every token, sinks included."""
        super().reset()
        self.seen = 0


@dataclass(frozen=True)
class CachePolicy:
    """Which cache :func:`selfattention.generate.make_caches` builds: ``full``, ``window`` or ``sinks``.

    Attributes:
        kind: one of :data:`POLICIES`.
        window: the latest tokens kept by ``window`` and ``sinks``; ``None``: as many as the context
            allows besides the sinks. Not used by ``full``.
        sinks: the first tokens kept by ``sinks`` (default 4, as in StreamingLLM). Not used otherwise.

    Raises:
        ValueError: an unknown kind, a window below 1 or sinks below 1 for ``sinks``.
    """

    kind: str = "full"
    window: int | None = None
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown cache policy {self.kind!r}; choose one of {list(POLICIES)}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.kind == "sinks" and self.sinks < 1:
            raise ValueError(f"the sinks policy keeps at least 1 sink, got sinks={self.sinks}")

    @property
    def num_sinks(self) -> int:
        """The sinks actually kept: ``sinks`` for the ``sinks`` policy, else 0."""
        return self.sinks if self.kind == "sinks" else 0

    def window_for(self, context_length: int) -> int:
        """The window for a model of ``context_length`` positions (``sinks + window`` may not exceed it).

        Raises:
            ValueError: when sinks and window do not fit the context.
        """
        window = self.window if self.window is not None else context_length - self.num_sinks
        if window < 1 or self.num_sinks + window > context_length:
            raise ValueError(
                f"{self.num_sinks} sinks + a window of {window} tokens must fit context_length={context_length}"
            )
        return window
