"""Attention over a sequence split across processes: ring attention (context parallelism).

Each process (a *rank* of a ``torch.distributed`` group of ``N`` ranks) holds one slice of the sequence:
its queries and the keys/values of the same tokens. Key/value blocks travel around the ring (rank ``r``
sends to ``r + 1`` and receives from ``r - 1``) with ``torch.distributed`` point-to-point operations, so
after ``N`` steps every rank has met every block. Each step attends the local queries to the block it
holds with the tiled backend, which also returns each row's log-sum-exp; the partial results merge exactly
by log-sum-exp rescaling, as the tiled backend merges its tiles. The next transfer is started before the
current block is computed, so communication overlaps compute. The backward pass sends the key/value blocks
around again, together with the gradients of the keys and values they have collected so far; after one
more hop each block's gradient is back with its owner.

Layouts (how a sequence of ``L`` tokens is cut into slices; see :func:`sequence_segments`):

* ``"contiguous"``: rank ``r`` holds one run of consecutive tokens, in rank order. Any lengths work, even
  uneven ones: they are exchanged at the start of each call.
* ``"zigzag"``: the sequence is cut into ``2N`` chunks and rank ``r`` holds chunks ``r`` and
  ``2N - 1 - r``. With ``causal=True`` every rank then does the same amount of work (in ``"contiguous"``
  the last rank does ``2N - 1`` times as much as the first).

The math is the same as single-process :func:`selfattention.attention` with the same ``causal``, ``scale``
and mask (the tests check this to 1e-5 for outputs and 1e-4 for gradients in float32), and every block is
computed by the ``"tiled"`` backend's :func:`~selfattention.backends.tiled.tiled_forward` and
:func:`~selfattention.backends.tiled.tiled_backward`. Masks are mask descriptions
(:mod:`selfattention.masks`) evaluated at positions in the whole sequence; dropout is not supported.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from selfattention import checks, masks
from selfattention.backends.tiled import merge_partials, tile_sizes, tiled_backward, tiled_forward
from selfattention.backends.tiles import batch_and_heads
from selfattention.functional import expand_kv_heads
from selfattention.masks import EMPTY, MaskDescription
from selfattention.steps import ScoreMod

if TYPE_CHECKING:
    from selfattention.modules import AttentionModule

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")
Segments = tuple[tuple[int, int], ...]  # global [start, stop) ranges, in the order a rank stores them


def sequence_segments(lengths: list[int], layout: Layout) -> list[Segments]:
    """Where each rank's slice lies in the whole sequence, given every rank's slice length.

    Args:
        lengths: the number of tokens on each rank, in rank order.
        layout: ``"contiguous"`` (any lengths) or ``"zigzag"`` (the lengths :func:`shard_sequence` gives).

    Returns:
        For each rank, its global ``(start, stop)`` ranges in the order its tokens are stored.

    Raises:
        ValueError: an unknown layout, a rank without tokens, or zigzag lengths that are not the
            ``2N``-chunk split of their total.

    >>> sequence_segments([3, 2], "contiguous")
    [((0, 3),), ((3, 5),)]
    >>> sequence_segments([3, 3], "zigzag")
    [((0, 2), (5, 6)), ((2, 4), (4, 5))]
    """
    _check_layout(layout)
    if any(n < 1 for n in lengths):
        raise ValueError(f"every rank needs at least one token; slice lengths are {lengths}")
    total, size = sum(lengths), len(lengths)
    if layout == "contiguous":
        starts = [sum(lengths[:r]) for r in range(size)]
        return [((start, start + n),) for start, n in zip(starts, lengths, strict=True)]
    chunks = _split(total, 2 * size)
    segments: list[Segments] = [(chunks[r], chunks[2 * size - 1 - r]) for r in range(size)]
    expected = [sum(stop - start for start, stop in s) for s in segments]
    if expected != lengths:
        raise ValueError(
            f"zigzag layout of {total} tokens over {size} ranks needs slice lengths {expected}, "
            f"got {lengths}; cut the sequence with shard_sequence(..., layout='zigzag')"
        )
    return segments


def shard_sequence(
    x: Tensor,
    *,
    layout: Layout = "contiguous",
    rank: int | None = None,
    world_size: int | None = None,
    dim: int = -2,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """This rank's slice of a whole sequence ``x`` along ``dim``.

    Lengths that do not divide evenly are allowed: the first ranks (or chunks, for ``"zigzag"``) get one
    token more, as :func:`torch.tensor_split` does.

    Args:
        x: the whole sequence, e.g. ``(B, H, L, D)``.
        layout: ``"contiguous"`` or ``"zigzag"`` (see the module docstring).
        rank, world_size: default to this process's rank and size in ``group``.
        dim: the sequence dimension.
        group: the process group (default: the whole world).

    Returns:
        The slice, e.g. ``(B, H, L_local, D)``; a copy for ``"zigzag"``, a view for ``"contiguous"``.

    Raises:
        ValueError: an unknown layout, a rank outside the world, or fewer tokens than slices.

    >>> x = torch.arange(6).view(1, 6, 1)
    >>> shard_sequence(x, layout="zigzag", rank=0, world_size=2).flatten().tolist()
    [0, 1, 5]
    """
    _check_layout(layout)
    rank = dist.get_rank(group) if rank is None else rank
    world_size = dist.get_world_size(group) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size) = [0, {world_size})")
    pieces = world_size * (2 if layout == "zigzag" else 1)
    if x.shape[dim] < pieces:
        raise ValueError(
            f"a sequence of {x.shape[dim]} tokens cannot be cut into {pieces} non-empty {layout} pieces "
            f"for {world_size} ranks"
        )
    chunks = _split(x.shape[dim], pieces)
    mine = [chunks[rank]] if layout == "contiguous" else [chunks[rank], chunks[pieces - 1 - rank]]
    parts = [x.narrow(dim, start, stop - start) for start, stop in mine]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def gather_sequence(
    x_local: Tensor, *, layout: Layout = "contiguous", dim: int = -2, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Put every rank's slice back into the whole sequence, on every rank (the inverse of the shard).

    Slices may have different lengths. This is a plain collective for results and inspection: gradients do
    not flow through it.

    Args:
        x_local: this rank's slice, e.g. ``(B, H, L_local, E)``; the other dimensions must agree on all ranks.
        layout: the layout the slices were cut with, the same on every rank (checked).
        dim: the sequence dimension.
        group: the process group (default: the whole world).

    Returns:
        The whole sequence, e.g. ``(B, H, L, E)``, in token order.
    """
    size = dist.get_world_size(group)
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, (x_local.shape[dim], layout), group=group)
    layouts = [theirs for _, theirs in gathered]
    if len(set(layouts)) > 1:  # every rank sees the same list, so every rank raises
        raise ValueError(f"gather_sequence needs one layout on every rank, got {layouts} (by rank)")
    lengths = [int(length) for length, _ in gathered]
    segments = sequence_segments(lengths, layout)
    moved = x_local.detach().movedim(dim, 0).contiguous()  # the sequence first, so padding is at the end
    padded = moved.new_zeros((max(lengths), *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    received = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(received, padded, group=group)
    whole = moved.new_empty((sum(lengths), *moved.shape[1:]))
    for rank in range(size):
        offset = 0
        for start, stop in segments[rank]:
            whole[start:stop] = received[rank][offset : offset + stop - start]
            offset += stop - start
    return whole.movedim(0, dim)


def ring_attention(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    *,
    causal: bool = False,
    mask: MaskDescription | None = None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    layout: Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Scaled dot-product attention of a sequence that is split across the ranks of ``group``.

    Every rank calls this with its own slice (cut with :func:`shard_sequence` and the same ``layout``) and
    gets back the context vectors of its own queries, equal to the matching rows of
    ``selfattention.attention(q, k, v, causal=causal, mask=mask, scale=scale)`` on the whole sequence.
    Differentiable: the backward pass is a second trip around the ring. Works with any ``torch.distributed``
    backend that has point-to-point operations (gloo on CPU, NCCL on GPU). Like a collective, it must be
    called by every rank of ``group``, in the same order, and so must its backward.

    Args:
        q_local: ``(..., H, T_local, D)``, this rank's queries.
        k_local: ``(..., G, T_local, D)``, the keys of the same tokens (``H % G == 0``; grouped heads are
            repeated before they travel).
        v_local: ``(..., G, T_local, E)``, their values.
        causal: each token attends to itself and earlier tokens of the whole sequence.
        mask: a mask description (:mod:`selfattention.masks`), evaluated at positions in the whole
            sequence; combined with ``causal``. Blocks it leaves empty are not computed. Mask tensors are
            not taken: no rank holds the whole ``(L, L)`` mask. A description that holds per-token data
            (``documents(ids)``) must hold the whole sequence's on every rank.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on the scaled scores, with positions
            in the whole sequence (as in the ``"tiled"`` backend).
        scale: multiplies the scores; ``None`` means ``1/sqrt(D)``.
        layout: how the sequence was cut: ``"contiguous"`` (uneven slices allowed) or ``"zigzag"``
            (balances the work when ``causal``). It must be the layout the slices were cut with: when the
            slice lengths fit both, nothing can tell the two apart.
        group: the process group (default: the whole world).

    Returns:
        Context vectors ``(..., H, T_local, E)`` for this rank's queries, in the dtype of ``q_local``.

    Raises:
        ValueError / TypeError: for local inputs that :func:`selfattention.attention` would reject, a mask
            that is not a description, slices whose shapes disagree across ranks (every rank raises the
            same error), and slice lengths that do not fit ``layout``.
    """
    checks.qkv(q_local, k_local, v_local)
    if q_local.shape[-2] != k_local.shape[-2]:
        raise ValueError(
            f"ring attention is self-attention: queries and keys must be the same tokens, got "
            f"{q_local.shape[-2]} queries and {k_local.shape[-2]} keys on this rank"
        )
    if mask is not None and not isinstance(mask, MaskDescription):
        raise TypeError(
            f"ring attention takes a mask description from selfattention.masks, got {type(mask).__name__}; "
            f"a mask tensor would need the whole (L, L) sequence on every rank"
        )
    checks.scale(scale)
    kv_heads = k_local.shape[-3] if k_local.dim() >= 3 else 1  # before expansion: ranks must agree on it too
    k_local, v_local = expand_kv_heads(q_local, k_local, v_local)
    scale = 1.0 / math.sqrt(q_local.shape[-1]) if scale is None else float(scale)
    settings = {
        "causal": bool(causal),
        "scale": scale,
        "layout": layout,
        "mask": None if mask is None else mask.fingerprint(),
        "score_mod": None if score_mod is None else masks.function_fingerprint(score_mod),
        "kv_heads": kv_heads,
        "requires_grad": [x.requires_grad for x in (q_local, k_local, v_local)],  # the backward ring needs all
    }
    ring = _Ring.build(q_local, k_local, v_local, layout, group, settings)
    if causal:
        mask = masks.causal() if mask is None else masks.causal() & mask
    batch, heads = batch_and_heads(q_local)
    if mask is not None:
        mask.check(batch, heads, ring.total, ring.total)
    attend = _Attend(
        scale=scale,
        mask=mask,
        score_mod=score_mod,
        batch=batch,
        heads=heads,
    )
    out: Tensor = _RingAttention.apply(q_local, k_local, v_local, ring, attend)
    return out


@dataclass(frozen=True)
class ContextParallel:
    """The strategy that makes :class:`~selfattention.modules.MultiHeadAttention` run as ring attention.

    An :class:`selfattention.strategies.AttendStrategy`, as :class:`~selfattention.strategies.LocalAttention`.

    ``MultiHeadAttention(..., context_parallel=ContextParallel(layout="zigzag"))``: each rank then passes
    only its own tokens, ``x_local (B, T_local, d_in)`` cut with ``shard_sequence(x, layout="zigzag", dim=1)``,
    and gets its own rows of the output. The projections act token by token; attention is
    :func:`ring_attention` over the whole sequence, causal or not as the module is. The weights must be the
    same on every rank; each rank's weight gradients cover its own tokens, so sum them over the group
    (``all_reduce``, as data-parallel training does) to get the gradient of the whole sequence.
    Not with a KV cache, a ``key_padding_mask``, ``rope`` (positions are per rank), ``return_weights``,
    :func:`selfattention.capture` or dropout in training; ``context_length`` is checked per rank.

    Args:
        layout: the layout the tokens were cut with: ``"contiguous"`` (the default, as in
            :func:`shard_sequence`) or ``"zigzag"`` (balanced work for a causal module).
        group: the process group (default: the whole world).
    """

    layout: Layout = "contiguous"
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        _check_layout(self.layout)

    def check_call(self, *, dropout: float, unsupported: dict[str, object]) -> None:
        """Raise ValueError for what a module call asks that ring attention does not do."""
        given = [name for name, value in unsupported.items() if value is not None and value is not False]
        if given:
            raise ValueError(f"context_parallel does not support {', '.join(given)}")
        if dropout > 0:
            raise ValueError(f"context_parallel does not support dropout in training (dropout={dropout})")

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
        """:func:`ring_attention` with this option's layout and group and the module's scale.

        ``query``, ``key``, ``value`` are this rank's slice; ``causal`` holds over the whole sequence. A mask
        and ``return_weights`` were refused by :meth:`check_call`; ``bounds`` is not needed (each rank checks
        its own blocks).
        """
        context = ring_attention(
            query, key, value, causal=causal, scale=module.scale, layout=self.layout, group=self.group
        )
        return context, None


@dataclass(frozen=True)
class _Ring:
    """Who this rank is in the ring, and where every rank's tokens lie in the whole sequence."""

    rank: int
    size: int
    segments: tuple[Segments, ...]
    group: dist.ProcessGroup | None

    @staticmethod
    def build(
        q: Tensor, k: Tensor, v: Tensor, layout: Layout, group: dist.ProcessGroup | None, settings: dict[str, Any]
    ) -> _Ring:
        """Exchange the slices' shapes and the call's settings (one small collective), check they agree on
        every rank, and place every slice."""
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered: list[Any] = [None] * size
        mine = (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype))
        dist.all_gather_object(gathered, (mine, settings), group=group)
        for other, (theirs, their_settings) in enumerate(gathered):
            if _without_length(theirs) != _without_length(mine):
                raise ValueError(
                    f"ring attention needs the same shapes on every rank apart from the sequence length: "
                    f"rank {rank} has q, k, v, dtype {mine}, rank {other} has {theirs}"
                )
            differ = [name for name in settings if their_settings[name] != settings[name]]
            if differ:
                raise ValueError(
                    f"ring attention needs the same call settings on every rank: rank {rank} has "
                    f"{', '.join(f'{n}={settings[n]!r}' for n in differ)}, rank {other} has "
                    f"{', '.join(f'{n}={their_settings[n]!r}' for n in differ)}"
                )
        lengths = [theirs[0][-2] for theirs, _ in gathered]
        return _Ring(rank, size, tuple(sequence_segments(lengths, layout)), group)

    @property
    def total(self) -> int:
        """The length ``L`` of the whole sequence."""
        return sum(self.length(rank) for rank in range(self.size))

    def owner(self, step: int) -> int:
        """The rank whose key/value block this rank holds at ``step`` (blocks move one rank per step)."""
        return (self.rank - step) % self.size

    def length(self, rank: int) -> int:
        return sum(stop - start for start, stop in self.segments[rank])

    def shift(self, send: tuple[Tensor, ...], recv: tuple[Tensor, ...], tag: int) -> list[Any]:
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous one."""
        if self.size == 1:
            for sent, received in zip(send, recv, strict=True):
                received.copy_(sent)
            return []
        next_rank, prev_rank = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        ops = []
        for i, (sent, received) in enumerate(zip(send, recv, strict=True)):
            ops.append(dist.P2POp(dist.isend, sent, group=self.group, tag=tag + i, group_peer=next_rank))
            ops.append(dist.P2POp(dist.irecv, received, group=self.group, tag=tag + i, group_peer=prev_rank))
        return list(dist.batch_isend_irecv(ops))


@dataclass(frozen=True)
class _Attend:
    """What each block computes: the tiled backend's options, and which blocks the mask leaves empty."""

    scale: float
    mask: MaskDescription | None
    score_mod: ScoreMod | None
    batch: int
    heads: int

    def blocks(self, ring: _Ring, owner: int) -> list[tuple[slice, slice, dict[str, Any]]]:
        """``(query rows, key rows, tiled options)`` of each piece of work when holding ``owner``'s keys.

        Without a mask or score_mod positions do not matter: one call does the whole block. Otherwise each
        pair of segments is one call at its global offsets, and pairs the mask empties are skipped (with
        ``causal`` that is every pair whose keys all come after its queries).
        """
        block_q, block_k = tile_sizes(self.batch * self.heads, sparse=self.mask is not None)
        options: dict[str, Any] = {"scale": self.scale, "mask": self.mask, "score_mod": self.score_mod,
                                   "block_q": block_q, "block_k": block_k}  # fmt: skip
        if self.mask is None and self.score_mod is None:
            return [(slice(None), slice(None), options)]
        total = ring.total
        work = []
        for q_rows, (q0, q1) in _local_rows(ring.segments[ring.rank]):
            for k_rows, (k0, k1) in _local_rows(ring.segments[owner]):
                if self.mask is not None:
                    kind = self.mask.block_map(
                        self.batch, self.heads, total, total, q1 - q0, k1 - k0, q_range=(q0, q1), kv_range=(k0, k1)
                    )
                    if int(kind[0, 0]) == EMPTY:
                        continue
                placed = {"q_offset": q0, "kv_offset": k0, "total": (total, total)}
                work.append((q_rows, k_rows, options | placed))
        return work


class _RingAttention(torch.autograd.Function):
    """Forward: once around the ring, saving only q, k, v, the output and its log-sum-exp. Backward: around
    again, recomputing each block's weights from the saved log-sum-exp (as the tiled backend does)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, ring: _Ring, attend: _Attend) -> Tensor:
        out, lse = _ring_forward(q, k, v, ring, attend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.attend = ring, attend
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, grad_out, ctx.ring, ctx.attend)
        return dq, dk, dv, None, None


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring, attend: _Attend) -> tuple[Tensor, Tensor]:
    """Every rank's key/value block visits, one per step; partial results merge by log-sum-exp."""
    acc = checks.work_dtype(q.dtype)
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=acc)  # (..., T_local, E)
    lse = q.new_full(q.shape[:-1], -math.inf, dtype=acc)  # (..., T_local)
    block = (k.contiguous(), v.contiguous())  # the keys and values held at this step
    for step in range(ring.size):
        owner = ring.owner(step)
        incoming, pending = None, []
        if step + 1 < ring.size:  # start the next transfer before computing on the current block
            incoming = _empty_block(k, v, ring.length(ring.owner(step + 1)))
            pending = ring.shift(block, incoming, tag=0)
        k_block, v_block = block
        for q_rows, k_rows, options in attend.blocks(ring, owner):
            out_part, lse_part = tiled_forward(
                q[..., q_rows, :], k_block[..., k_rows, :], v_block[..., k_rows, :], **options
            )
            out[..., q_rows, :], lse[..., q_rows] = merge_partials(
                out[..., q_rows, :], lse[..., q_rows], out_part, lse_part
            )
        for work in pending:
            work.wait()
        if incoming is not None:
            block = incoming
    return out.to(q.dtype), lse


def _ring_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, ring: _Ring, attend: _Attend
) -> tuple[Tensor, Tensor, Tensor]:
    """Key/value blocks go round again, each followed by the gradient of its keys and values so far."""
    acc = checks.work_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    block = (k.contiguous(), v.contiguous())
    grads_in: tuple[Tensor, ...] = ()  # dK, dV of the held block from the ranks it visited before
    grads_pending: list[Any] = []
    for step in range(ring.size):
        owner = ring.owner(step)
        incoming, pending = None, []
        if step + 1 < ring.size:
            incoming = _empty_block(k, v, ring.length(ring.owner(step + 1)))
            pending = ring.shift(block, incoming, tag=2)
        k_block, v_block = block
        dk_block = torch.zeros_like(k_block, dtype=acc)  # this rank's share of the block's dK and dV
        dv_block = torch.zeros_like(v_block, dtype=acc)
        for q_rows, k_rows, options in attend.blocks(ring, owner):
            dq_part, dk_part, dv_part = tiled_backward(
                q[..., q_rows, :],
                k_block[..., k_rows, :],
                v_block[..., k_rows, :],
                out[..., q_rows, :],
                lse[..., q_rows],
                grad_out[..., q_rows, :],
                **options,
            )
            dq[..., q_rows, :] += dq_part
            dk_block[..., k_rows, :] += dk_part
            dv_block[..., k_rows, :] += dv_part
        for work in grads_pending:  # the previous rank's share arrived while this step computed
            work.wait()
        if grads_in:
            dk_block += grads_in[0]
            dv_block += grads_in[1]
        # After the last step the block's owner is the next rank, so this hop returns every gradient home.
        grads_in = _empty_block(k, v, ring.length(ring.owner(step + 1)), dtype=acc)
        grads_pending = ring.shift((dk_block, dv_block), grads_in, tag=4)
        for work in pending:
            work.wait()
        if incoming is not None:
            block = incoming
    for work in grads_pending:
        work.wait()
    dk, dv = grads_in
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- small helpers ---


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")


def _split(total: int, pieces: int) -> list[tuple[int, int]]:
    """``total`` tokens in ``pieces`` runs, the first ``total % pieces`` one longer (as tensor_split)."""
    base, extra = divmod(total, pieces)
    bounds = [0]
    for piece in range(pieces):
        bounds.append(bounds[-1] + base + (1 if piece < extra else 0))
    return list(itertools.pairwise(bounds))


def _local_rows(segments: Segments) -> list[tuple[slice, tuple[int, int]]]:
    """Each segment's rows in the local tensor, with its global range."""
    rows, offset = [], 0
    for start, stop in segments:
        rows.append((slice(offset, offset + stop - start), (start, stop)))
        offset += stop - start
    return rows


def _without_length(shapes: Any) -> Any:
    q, k, v, dtype = shapes
    return (q[:-2] + q[-1:], k[:-2] + k[-1:], v[:-2] + v[-1:], dtype)


def _empty_block(k: Tensor, v: Tensor, length: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Buffers for another rank's keys ``(..., length, D)`` and values ``(..., length, E)``."""
    return (
        k.new_empty((*k.shape[:-2], length, k.shape[-1]), dtype=dtype),
        v.new_empty((*v.shape[:-2], length, v.shape[-1]), dtype=dtype),
    )
