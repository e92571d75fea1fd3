"""Mask descriptions: masks written as rules on positions, which know where they are empty or full.

A mask description says which query may attend to which key without building the ``(T, S)`` boolean
tensor. It can still build it (:meth:`MaskDescription.materialize`), and it can say, for every tile of
``block_q`` queries by ``block_k`` keys, whether that tile is

* ``EMPTY``: no query of the tile may attend to any key of the tile (the tile is skipped),
* ``FULL``: every pair is allowed (the tile needs no mask), or
* ``PARTIAL``: some are allowed (the tile gets its slice of the mask).

That classification (:meth:`MaskDescription.block_map`) is what lets the ``"tiled"`` and
``"blocksparse"`` backends do work only where attention is allowed. It is conservative by design: a tile
may be called ``PARTIAL`` when it is in fact full or empty (the answer stays exact, only slower), never the
other way round.

The rules, with ``True`` = may attend (the convention of the whole package). Queries are placed at the
*end* of the key sequence (bottom-right, like :func:`selfattention.functional.causal_mask`): query ``i``
sits at key position ``p = i + S - T``, so with ``T == S`` it is simply position ``i``.

=================================  ==============================================================
``causal()``                       key ``j <= p``; ``align="top_left"`` uses ``j <= i`` instead
``sliding_window(size)``           ``p - size < j <= p``: the query itself and the ``size - 1`` keys before it
``padding(lengths)``               ``j < lengths[b]``: keys past each batch row's length are padding
``documents(ids)``                 ``ids[b, p] == ids[b, j]``: packed sequences attend within their own id
``prefix_lm(prefix_len)``          ``j < prefix_len`` or ``j <= p``: a bidirectional prefix, then causal
``a & b``, ``a | b``               both allow, either allows
``from_function(fn)``              ``fn(b, h, q_idx, kv_idx)`` returns a boolean tensor (FlexAttention's idea)
=================================  ==============================================================

>>> from selfattention import masks
>>> (masks.causal() & masks.sliding_window(2)).materialize(1, 1, 3, 3)[0, 0].int().tolist()
[[1, 0, 0], [1, 1, 0], [0, 1, 1]]
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, MutableMapping, Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile kinds in a block map (``torch.int8``)."""

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
T = TypeVar("T")


class MaskDescription:
    """Base class: a rule on ``(b, h, q_idx, kv_idx)``; subclasses give :meth:`allowed` and a block map."""

    shift_invariant: bool = False
    """True when the rule reads ``q_idx - kv_idx`` only (and ``T``, ``S``): tiles at one offset have one mask."""
    window: int | None = None
    """The most keys a query may attend, counting its own position, when the rule bounds them (a sliding
    window's ``size``); ``None`` when it does not. Block-sparse backends pick narrower tiles for narrow windows."""

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        """Boolean tensor, ``True`` where query ``q`` may attend key ``kv`` (index tensors broadcast)."""
        raise NotImplementedError

    def check(self, batch: int, heads: int, num_queries: int, num_keys: int) -> None:
        """Raise ValueError when the description does not fit attention of this shape."""

    def version(self) -> tuple[int, ...] | None:
        """Changes when the rule does: the versions of the tensors it reads (ids, lengths), which an in-place
        edit bumps; ``()`` for rules of plain numbers; ``None`` when unknown (a function's). What is derived
        from a description (a GPU block mask) is reused only while this stays the same."""
        return ()

    def fingerprint(self) -> str:
        """A text that differs when the rule does (its repr plus what the repr leaves out: a checksum of
        document ids, a function's code and captured values), to compare descriptions across processes."""
        return repr(self)

    def _bounds_map(self, bounds: _Bounds) -> Tensor | None:
        """The block map from tile bounds alone, or None when the rule needs the generic evaluation."""
        return None

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        """The rule as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for attention of this shape.

        Same rule as :meth:`allowed`, written for what :func:`torch.nn.attention.flex_attention.create_mask`
        and the compiled kernels give it: 0-dimensional index tensors (under ``torch.vmap``). The numbers it
        needs (offsets, window sizes, lengths, ids) are tensors on ``device`` captured by the function, so
        that one compiled kernel serves every value of them.

        >>> from torch.nn.attention.flex_attention import create_mask
        >>> create_mask(sliding_window(2).mask_mod(3, 3), 1, 1, 3, 3, device="cpu")[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
        """
        raise NotImplementedError(f"{self!r} has no mask_mod")

    def __and__(self, other: MaskDescription) -> MaskDescription:
        return _Combined(self, other, "and")

    def __or__(self, other: MaskDescription) -> MaskDescription:
        return _Combined(self, other, "or")

    def block(
        self,
        batch: int,
        heads: int,
        q_range: tuple[int, int],
        kv_range: tuple[int, int],
        num_queries: int,
        num_keys: int,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The boolean mask of one tile: queries ``q_range``, keys ``kv_range`` (global positions).

        Returns:
            Boolean ``(batch|1, heads|1, q_end - q_start, kv_end - kv_start)``: size 1 where the rule does not
            depend on the batch row or the head.
        """
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        q = torch.arange(*q_range, device=device).view(1, 1, -1, 1)
        kv = torch.arange(*kv_range, device=device).view(1, 1, 1, -1)
        out = self.allowed(b, h, q, kv, num_queries, num_keys)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(f"a mask rule must return a boolean tensor, got {_describe(out)}")
        shape = (batch, heads, q_range[1] - q_range[0], kv_range[1] - kv_range[0])
        if out.dim() > 4:
            raise ValueError(f"a mask rule returned shape {tuple(out.shape)}, which is not 4-D {shape}")
        out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
        try:
            torch.broadcast_shapes(out.shape, shape)
        except RuntimeError as err:
            raise ValueError(f"a mask rule returned shape {tuple(out.shape)}, not broadcastable to {shape}") from err
        return out.expand(*out.shape[:2], *shape[2:])

    def materialize(
        self,
        batch: int,
        heads: int,
        num_queries: int,
        num_keys: int,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The whole boolean mask, ``(batch, heads, T, S)`` (size 1 where it does not depend on b or h).

        Raises:
            ValueError: when the description does not fit this shape (see :meth:`check`).
        """
        self.check(batch, heads, num_queries, num_keys)
        return self.block(batch, heads, (0, num_queries), (0, num_keys), num_queries, num_keys, device)

    def block_map(
        self,
        batch: int,
        heads: int,
        num_queries: int,
        num_keys: int,
        block_q: int,
        block_k: int,
        *,
        q_range: tuple[int, int] | None = None,
        kv_range: tuple[int, int] | None = None,
    ) -> Tensor:
        """Classify every tile of ``block_q`` queries by ``block_k`` keys as EMPTY, PARTIAL or FULL.

        A tile is FULL only if it is full for every batch row and head, EMPTY only if it is empty for all.

        Args:
            batch, heads, num_queries, num_keys: the shape of the attention (``T``, ``S`` in full).
            block_q, block_k: tile sizes; the last tile of each axis may be shorter.
            q_range, kv_range: classify only these global positions (e.g. one chunk of a long
                sequence); default all of them.

        Returns:
            ``torch.int8`` of shape ``(ceil(Tq / block_q), ceil(Sk / block_k))`` for the ranges' lengths.
        """
        bounds = _Bounds(q_range or (0, num_queries), kv_range or (0, num_keys), block_q, block_k)
        bounds.batch, bounds.heads, bounds.num_queries, bounds.num_keys = batch, heads, num_queries, num_keys
        kinds = self._bounds_map(bounds)
        return kinds if kinds is not None else self._evaluated_map(bounds)

    def _evaluated_map(self, bounds: _Bounds) -> Tensor:
        """Generic block map: evaluate the rule one row of tiles at a time and reduce each tile."""
        (q0, q1), (k0, k1) = bounds.q_range, bounds.kv_range
        nk = bounds.kv_first.shape[1]
        rows = []
        for qs in range(q0, q1, bounds.block_q):
            tile = self.block(
                bounds.batch,
                bounds.heads,
                (qs, min(qs + bounds.block_q, q1)),
                (k0, k1),
                bounds.num_queries,
                bounds.num_keys,
            )
            tile = tile.expand(bounds.batch, bounds.heads, -1, k1 - k0)
            pad = nk * bounds.block_k - (k1 - k0)
            any_ = torch.nn.functional.pad(tile, (0, pad), value=False)
            all_ = torch.nn.functional.pad(tile, (0, pad), value=True)
            any_ = any_.unflatten(-1, (nk, bounds.block_k)).any(-1).any(-2).flatten(0, 1).any(0)
            all_ = all_.unflatten(-1, (nk, bounds.block_k)).all(-1).all(-2).flatten(0, 1).all(0)
            rows.append(_kinds(full=all_, empty=~any_))
        return torch.stack(rows) if rows else torch.zeros(0, nk, dtype=torch.int8)

    def __repr__(self) -> str:
        return f"{type(self).__name__.lstrip('_')}()"


class _Bounds:
    """First and last global position of every tile, as ``(nq, 1)`` and ``(1, nk)`` integer tensors."""

    def __init__(self, q_range: tuple[int, int], kv_range: tuple[int, int], block_q: int, block_k: int):
        self.q_range, self.kv_range, self.block_q, self.block_k = q_range, kv_range, block_q, block_k
        self.q_first = torch.arange(q_range[0], q_range[1], block_q).unsqueeze(1)
        self.q_last = (self.q_first + block_q).clamp(max=q_range[1]) - 1
        self.kv_first = torch.arange(kv_range[0], kv_range[1], block_k).unsqueeze(0)
        self.kv_last = (self.kv_first + block_k).clamp(max=kv_range[1]) - 1
        self.batch = self.heads = self.num_queries = self.num_keys = 0


def _kinds(*, full: Tensor, empty: Tensor, bounds: _Bounds | None = None) -> Tensor:
    """EMPTY where ``empty``, FULL where ``full``, PARTIAL elsewhere (int8), over the tiles of ``bounds``."""
    shape = torch.broadcast_shapes(full.shape, empty.shape)
    if bounds is not None:
        shape = torch.broadcast_shapes(shape, (bounds.q_first.shape[0], bounds.kv_first.shape[1]))
    kinds = torch.full(shape, PARTIAL, dtype=torch.int8)
    return kinds.masked_fill(full, FULL).masked_fill(empty, EMPTY)


def _number(value: int, device: torch.device | str | None) -> Tensor:
    """A 0-dimensional integer tensor: captured by a mask_mod, it is an input of the compiled kernel, not a constant."""
    return torch.tensor(value, dtype=torch.long, device=device)


def _describe(value: object) -> str:
    return f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__


class _Causal(MaskDescription):
    shift_invariant = True

    def __init__(self, align: str):
        self.align = align

    def _offset(self, num_queries: int, num_keys: int) -> int:
        return num_keys - num_queries if self.align == "bottom_right" else 0

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        return kv <= q + self._offset(num_queries, num_keys)

    def _bounds_map(self, bounds: _Bounds) -> Tensor:
        off = self._offset(bounds.num_queries, bounds.num_keys)
        return _kinds(full=bounds.kv_last <= bounds.q_first + off, empty=bounds.kv_first > bounds.q_last + off)

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        offset = _number(self._offset(num_queries, num_keys), device)
        return lambda b, h, q, kv: kv <= q + offset

    def __repr__(self) -> str:
        return f"causal(align={self.align!r})"


def causal(align: Literal["bottom_right", "top_left"] = "bottom_right") -> MaskDescription:
    """Each query attends to its own position and the keys before it.

    ``align="bottom_right"`` (the package's default, as :func:`~selfattention.functional.causal_mask`)
    puts the ``T`` queries at the last ``T`` key positions; ``"top_left"`` (PyTorch's ``is_causal``)
    puts query ``i`` at key position ``i``. The two agree when ``T == S``.

    Raises:
        ValueError: for any other ``align``.
    """
    if align not in ("bottom_right", "top_left"):
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    return _Causal(align)


def is_causal(mask: object, num_queries: int, num_keys: int) -> bool:
    """True when ``mask`` is exactly the bottom-right causal mask, so that ``causal=True`` may replace it."""
    return isinstance(mask, _Causal) and (mask.align == "bottom_right" or num_queries == num_keys)


class _SlidingWindow(MaskDescription):
    shift_invariant = True

    def __init__(self, size: int):
        self.size = self.window = size

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        p = q + (num_keys - num_queries)
        return (kv <= p) & (kv > p - self.size)

    def _bounds_map(self, bounds: _Bounds) -> Tensor:
        off = bounds.num_keys - bounds.num_queries
        full = (bounds.kv_last <= bounds.q_first + off) & (bounds.kv_first > bounds.q_last + off - self.size)
        empty = (bounds.kv_first > bounds.q_last + off) | (bounds.kv_last <= bounds.q_first + off - self.size)
        return _kinds(full=full, empty=empty)

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        offset, size = _number(num_keys - num_queries, device), _number(self.size, device)
        return lambda b, h, q, kv: (kv <= q + offset) & (kv > q + offset - size)

    def __repr__(self) -> str:
        return f"sliding_window({self.size})"


def sliding_window(size: int) -> MaskDescription:
    """Causal attention to the last ``size`` positions: the query itself and the ``size - 1`` keys before it.

    Raises:
        ValueError: unless ``size`` is a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"sliding window size must be a positive integer, got {size!r}")
    return _SlidingWindow(size)


def _per_row(name: str, values: Tensor | Sequence[int], dims: int) -> Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be integers, got dtype {tensor.dtype}")
    if tensor.dim() not in range(1, dims + 1):
        raise ValueError(f"{name} must have {dims} dimension(s) at most, got shape {tuple(tensor.shape)}")
    return tensor.long()


def _rows(name: str, rows: int, batch: int) -> None:
    if rows not in (1, batch):
        raise ValueError(f"{name} has {rows} batch rows but the attention has batch {batch}")


class _Padding(MaskDescription):
    def __init__(self, lengths: Tensor):
        self.lengths = lengths

    def version(self) -> tuple[int, ...]:
        return (self.lengths._version,)

    def check(self, batch: int, heads: int, num_queries: int, num_keys: int) -> None:
        _rows("padding lengths", self.lengths.shape[0], batch)
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        if longest > num_keys:
            raise ValueError(f"padding lengths ({self.lengths.tolist()}) exceed the number of keys ({num_keys})")

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        rows = self.lengths.shape[0]
        lengths = self.lengths.to(kv.device)[b if rows > 1 else torch.zeros_like(b)]  # (B, 1, 1, 1)
        return kv < lengths

    def _bounds_map(self, bounds: _Bounds) -> Tensor:
        shortest, longest = int(self.lengths.min()), int(self.lengths.max())
        return _kinds(full=bounds.kv_last < shortest, empty=bounds.kv_first >= longest, bounds=bounds)

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        lengths = self.lengths.to(device)
        if lengths.shape[0] == 1:
            return lambda b, h, q, kv: kv < lengths[0]
        return lambda b, h, q, kv: kv < lengths[b]

    def __repr__(self) -> str:
        return f"padding({self.lengths.tolist()})"


def padding(lengths: Tensor | Sequence[int]) -> MaskDescription:
    """Key padding: in batch row ``b`` only the first ``lengths[b]`` keys are real.

    Queries are not masked (a padded query still attends to the real keys; its output is usually ignored).
    Note the convention: ``nn.MultiheadAttention``'s ``key_padding_mask`` is ``True`` = *ignore*; here a
    length per row says what may be attended.

    Args:
        lengths: ``(B,)`` integers (one length broadcasts over the batch).

    Raises:
        TypeError: non-integer lengths. ValueError: negative lengths, wrong shape; when used, lengths > S.
    """
    tensor = _per_row("padding lengths", lengths, 1)
    if tensor.numel() == 0 or bool((tensor < 0).any()):
        raise ValueError(f"padding lengths must be non-negative and not empty, got {tensor.tolist()}")
    return _Padding(tensor)


class _Documents(MaskDescription):
    def __init__(self, ids: Tensor):
        self.ids = ids  # (rows, S)

    def version(self) -> tuple[int, ...]:
        return (self.ids._version,)

    def check(self, batch: int, heads: int, num_queries: int, num_keys: int) -> None:
        _rows("document ids", self.ids.shape[0], batch)
        if self.ids.shape[1] != num_keys:
            raise ValueError(f"document ids cover {self.ids.shape[1]} positions but there are {num_keys} keys")
        if num_queries > num_keys:
            raise ValueError(f"documents() needs T <= S (queries are the last T keys), got T={num_queries}")

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        ids = self.ids.to(kv.device)
        row = b if ids.shape[0] > 1 else torch.zeros_like(b)
        return ids[row, q + (num_keys - num_queries)] == ids[row, kv]

    def _bounds_map(self, bounds: _Bounds) -> Tensor:
        off = bounds.num_keys - bounds.num_queries
        (q0, q1), (k0, k1) = bounds.q_range, bounds.kv_range
        q_lo, q_hi = _block_min_max(self.ids[:, q0 + off : q1 + off], bounds.block_q)  # (rows, nq)
        k_lo, k_hi = _block_min_max(self.ids[:, k0:k1], bounds.block_k)  # (rows, nk)
        q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
        full = ((q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)).all(0)
        empty = ((q_hi < k_lo) | (k_hi < q_lo)).all(0)
        return _kinds(full=full, empty=empty)

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        ids, offset = self.ids.to(device), _number(num_keys - num_queries, device)
        if ids.shape[0] == 1:
            return lambda b, h, q, kv: ids[0, q + offset] == ids[0, kv]
        return lambda b, h, q, kv: ids[b, q + offset] == ids[b, kv]

    def __repr__(self) -> str:
        return f"documents(<{tuple(self.ids.shape)} ids>)"

    def fingerprint(self) -> str:
        return f"{self!r} crc32 {zlib.crc32(self.ids.detach().cpu().contiguous().numpy().tobytes()):08x}"


def _block_min_max(ids: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-tile minimum and maximum of ``ids (rows, n)`` along the last axis."""
    pad = -ids.shape[1] % block
    lo = hi = ids
    if pad:  # the last tile is short: padded with values that change neither its minimum nor its maximum
        lo = torch.nn.functional.pad(ids, (0, pad), value=int(ids.max()) if ids.numel() else 0)
        hi = torch.nn.functional.pad(ids, (0, pad), value=int(ids.min()) if ids.numel() else 0)
    return lo.unflatten(1, (-1, block)).amin(-1), hi.unflatten(1, (-1, block)).amax(-1)


def documents(ids: Tensor | Sequence[int]) -> MaskDescription:
    """Packed sequences: a query attends only to keys with the same document id.

    Combine with :func:`causal` (``documents(ids) & causal()``) for packed causal language modelling.
    Tiles are classified from each tile's smallest and largest id, which is exact for ids that increase
    along the sequence (the usual packing); other orders stay correct, only with fewer skipped tiles.

    Args:
        ids: ``(S,)`` or ``(B, S)`` integers, the document of every position. With ``T < S`` the queries
            are the last ``T`` positions.

    Raises:
        TypeError: non-integer ids. ValueError: wrong shape; when used, a length other than ``S``.
    """
    tensor = _per_row("document ids", ids, 2)
    return _Documents(tensor.unsqueeze(0) if tensor.dim() == 1 else tensor)


class _KeysBefore(MaskDescription):
    """Every query may attend to the keys ``j < count``."""

    def __init__(self, count: int):
        self.count = count

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        return (kv < self.count).expand(*kv.shape[:-2], q.shape[-2], kv.shape[-1])

    def _bounds_map(self, bounds: _Bounds) -> Tensor:
        return _kinds(full=bounds.kv_last < self.count, empty=bounds.kv_first >= self.count, bounds=bounds)

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        count = _number(self.count, device)
        return lambda b, h, q, kv: kv < count


def prefix_lm(prefix_len: int) -> MaskDescription:
    """Prefix language modelling: every query sees the first ``prefix_len`` keys, and the rest causally.

    Raises:
        ValueError: unless ``prefix_len`` is a non-negative integer.
    """
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix length must be a non-negative integer, got {prefix_len!r}")
    return _KeysBefore(prefix_len) | causal()


class _Combined(MaskDescription):
    def __init__(self, left: MaskDescription, right: MaskDescription, op: str):
        for side in (left, right):
            if not isinstance(side, MaskDescription):
                raise TypeError(f"can only combine mask descriptions, got {type(side).__name__}")
        self.left, self.right, self.op = left, right, op
        self.shift_invariant = left.shift_invariant and right.shift_invariant
        windows = [side.window for side in (left, right) if side.window is not None]
        if op == "and" and windows:  # both must allow: the narrower window bounds the keys
            self.window = min(windows)
        elif op == "or" and len(windows) == 2:  # either may allow: the wider one
            self.window = max(windows)

    def check(self, batch: int, heads: int, num_queries: int, num_keys: int) -> None:
        self.left.check(batch, heads, num_queries, num_keys)
        self.right.check(batch, heads, num_queries, num_keys)

    def version(self) -> tuple[int, ...] | None:
        left, right = self.left.version(), self.right.version()
        return None if left is None or right is None else (*left, *right)

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        left = self.left.allowed(b, h, q, kv, num_queries, num_keys)
        right = self.right.allowed(b, h, q, kv, num_queries, num_keys)
        return left & right if self.op == "and" else left | right

    def _bounds_map(self, bounds: _Bounds) -> Tensor | None:
        left, right = self.left._bounds_map(bounds), self.right._bounds_map(bounds)
        if left is None or right is None:
            return None
        if self.op == "and":  # empty if either is empty, full only if both are full
            return torch.minimum(left, right)
        return torch.maximum(left, right)  # full if either is full, empty only if both are empty

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        left = self.left.mask_mod(num_queries, num_keys, device)
        right = self.right.mask_mod(num_queries, num_keys, device)
        if self.op == "and":
            return lambda b, h, q, kv: left(b, h, q, kv) & right(b, h, q, kv)
        return lambda b, h, q, kv: left(b, h, q, kv) | right(b, h, q, kv)

    def __repr__(self) -> str:
        return f"({self.left!r} {'&' if self.op == 'and' else '|'} {self.right!r})"

    def fingerprint(self) -> str:
        return f"({self.left.fingerprint()} {'&' if self.op == 'and' else '|'} {self.right.fingerprint()})"


class _FromFunction(MaskDescription):
    def __init__(self, fn: MaskFn):
        self.fn = fn

    def version(self) -> None:
        return None  # what the function reads cannot be seen from here

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, num_queries: int, num_keys: int) -> Tensor:
        return self.fn(b, h, q, kv)

    def mask_mod(self, num_queries: int, num_keys: int, device: torch.device | str | None = None) -> MaskFn:
        return self.fn  # already FlexAttention's form; tensors it closes over must be on the attention's device

    def __repr__(self) -> str:
        return f"from_function({getattr(self.fn, '__name__', 'fn')})"

    def fingerprint(self) -> str:
        return f"from_function({function_fingerprint(self.fn)})"


def remembered(
    table: MutableMapping[MaskDescription, dict[tuple[object, ...], T]],
    mask: MaskDescription,
    key: tuple[object, ...],
    make: Callable[[], T],
    limit: int,
) -> T:
    """``make()``, kept in ``table`` for the description object ``mask`` under ``key`` and its version.

    What is derived from a description (a GPU block mask, a block-sparse plan) is made once for a model that
    passes one description to every layer and step. A description edited in place (document ids) has a new
    :meth:`~MaskDescription.version` and gets a new one; one whose version is unknown (``from_function``) is
    never kept. ``table`` is a ``weakref.WeakKeyDictionary``, so entries go with their description; at most
    ``limit`` per description (the oldest goes first).
    """
    version = mask.version()
    if version is None:
        return make()
    known = table.setdefault(mask, {})
    entry = (*key, version)
    if entry not in known:
        if len(known) >= limit:
            known.pop(next(iter(known)))
        known[entry] = make()
    return known[entry]


def function_fingerprint(fn: Callable[..., object]) -> str:
    """A text that differs between functions that compute differently, as far as can be seen: the qualified
    name, and for Python functions a checksum of the bytecode, the constants and the captured values.
    Equal texts do not prove equal functions (a global they read may differ)."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    code = getattr(fn, "__code__", None)
    if code is None:
        return name
    cells = tuple(repr(cell.cell_contents) for cell in (getattr(fn, "__closure__", None) or ()))
    seen = repr((code.co_code, code.co_consts, code.co_names, cells)).encode()
    return f"{name} crc32 {zlib.crc32(seen):08x}"


def from_function(fn: MaskFn) -> MaskDescription:
    """A mask given by a rule ``fn(b, h, q_idx, kv_idx) -> bool tensor`` (``True`` = may attend).

    The four arguments are integer index tensors shaped to broadcast against each other (``(B,1,1,1)``,
    ``(1,H,1,1)``, ``(1,1,T,1)``, ``(1,1,1,S)``), so ``fn`` is written with elementwise operations, as in
    FlexAttention's ``mask_mod``. Tiles are classified by evaluating ``fn`` one row of tiles at a time.

    >>> m = from_function(lambda b, h, q, kv: (q - kv).abs() <= 1)
    >>> m.materialize(1, 1, 3, 3)[0, 0].int().tolist()
    [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    """
    if not callable(fn):
        raise TypeError(f"from_function needs a callable, got {type(fn).__name__}")
    return _FromFunction(fn)
