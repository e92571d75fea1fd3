"""The ``"blocksparse"`` backend: the fused kernel run only on the tiles a mask leaves non-empty.

PyTorch's fused CPU kernel computes every score it is given, masked or not. This backend cuts the
attention into the same tiles as ``"tiled"`` (see :class:`~selfattention.backends.tiles.Tiles`) and, for
each block of queries, calls the fused kernel once per run of neighbouring non-empty key blocks of the
same kind: FULL runs without a mask, PARTIAL runs with that run's slice of the mask (a diagonal tile of a
plain causal call uses the kernel's own causal mode). The runs' results are put together with
:func:`~selfattention.backends.tiled.merge_partials` from their log-sum-exps, which the fused kernel
returns beside its output. Query blocks whose runs have the same shapes (every block of a sliding window past
the first sees a window of keys of one length) are done together: one fused call per run position takes
all of them as a batch, with their masks shared when they are equal and stacked when not. Many small calls
are what cost on the CPU (each pays the kernel's set-up and splits a small task over the cores); one call
over many blocks keeps the cores busy.

The backward pass is the FlashAttention-2 one of :func:`~selfattention.backends.tiled.tiled_backward`,
with each run's tile work done by the fused kernel's backward, given the *merged* output and
log-sum-exp. Memory stays ``O(T + S)`` plus one run's mask: no ``(T, S)`` tensor is ever built.

It uses ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, the CPU kernel
behind :func:`torch.nn.functional.scaled_dot_product_attention`: a private operator, tested here for the
pinned torch version, which is why the plain-PyTorch ``"tiled"`` backend stays the readable account.
On a GPU the backend is FlexAttention's compiled kernel on the same tiles (:mod:`selfattention.backends.flex`).
"""

from __future__ import annotations

import math
import weakref
from functools import reduce
from itertools import groupby, pairwise
from typing import Any

import torch
from torch import Tensor

from selfattention import checks
from selfattention.backends import flex
from selfattention.backends.recompute import recompute_attention
from selfattention.backends.tiled import merge_partials
from selfattention.backends.tiles import AnyMask, Tiles, as_4d
from selfattention.masks import MaskDescription, remembered

BLOCK = 256
"""Default tile size for queries and keys."""


def block_size(mask: AnyMask) -> int:
    """The tile size for ``mask``: :data:`BLOCK`, halved for a window no wider than a tile (a rule of the
    offset alone: a window, with causal or a narrower window; not with documents, whose tiles aligned to
    the documents run faster whole: 6.3 against 8.6 ms forward for documents(16) & window 256, 4096 tokens).

    A query block of ``b`` rows under a window of ``w`` keys computes about ``b + w`` keys per row to use
    ``w``: with ``w = 256``, 512 for 256 at ``b = 256`` and 384 at ``b = 128``. Measured on 2 cores at
    4096 tokens and four heads, forward+backward: window 128, 43.2 ms at 256-tiles and 30.5 ms at 128;
    window 256, 46.4 and 40.2 ms; window 512, 57.7 and 63.8 ms (the smaller calls cost more than they save).
    """
    window = mask.window if isinstance(mask, MaskDescription) and mask.shift_invariant else None
    return BLOCK // 2 if window is not None and window <= BLOCK else BLOCK


MASK_LIMIT = 1 << 18
"""Largest mask (in elements) built for one fused call spanning FULL and PARTIAL blocks (1 MiB in float32)."""


def _fused() -> tuple[Any, Any]:
    ops = torch.ops.aten
    return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward


def _mask_as_4d(mask: AnyMask, query: Tensor) -> AnyMask:
    if not isinstance(mask, Tensor):
        return mask
    mask = mask.reshape((1,) * (query.dim() - mask.dim()) + tuple(mask.shape))
    if mask.dim() > 4:  # the leading dimensions are flattened (by as_4d): each needs its full size first
        mask = mask.expand(*query.shape[:-3], *mask.shape[-3:])
    return as_4d(mask)


Masks = dict[tuple[int, int, int, bool], tuple[Tensor, Tensor | None]]
"""Tile masks (and the rows with a key, unless all have one) by offset ``k0 - q0``, rows and keys."""


class _Run:
    """Keys ``[k0, k1)`` of one query block, done in one fused call (mask: None, "causal" or a tensor).

    ``masks``: where the call's mask is shift-invariant (causal, sliding windows), the masks made so far,
    reused by every run at the same offset and of the same size (a window's blocks all have one).
    """

    def __init__(
        self, tiles: Tiles, rows: tuple[int, int], k0: int, k1: int, partial: bool, dtype: torch.dtype,
        masks: Masks | None = None,
    ):  # fmt: skip
        self.k0, self.k1, self.is_causal = k0, k1, False
        self.mask: Tensor | None = None
        self.row_ok: Tensor | None = None
        if not partial:
            return
        diagonal = k0 - rows[0] == tiles.num_keys - tiles.num_queries and k1 - k0 == rows[1] - rows[0]
        if tiles.causal and tiles.mask is None and diagonal:
            self.is_causal = True  # the kernel's top-left causal mode equals bottom-right on a square tile
            return
        every_row_has_a_key = tiles.mask is None and k0 == 0 and tiles.num_keys >= tiles.num_queries
        key = (k0 - rows[0], rows[1] - rows[0], k1 - k0, every_row_has_a_key)
        if masks is not None and key in masks:
            self.mask, self.row_ok = masks[key]
            return
        tile = tiles.tile_mask(rows, (k0, k1))
        assert tile is not None, "a partial tile has a mask"
        tile = as_4d(tile)  # (B|1, H|1, rows, keys)
        if tile.dtype == torch.bool:
            if not every_row_has_a_key:
                self.row_ok = tile.any(dim=-1, keepdim=True)  # rows with at least one allowed key in the run
            tile = torch.where(tile, 0.0, -math.inf)
        elif not every_row_has_a_key:
            self.row_ok = (tile > -math.inf).any(dim=-1, keepdim=True)
        self.mask = tile.to(dtype)
        if masks is not None:
            masks[key] = (self.mask, self.row_ok)


def _runs(tiles: Tiles, i: int, rows: tuple[int, int], dtype: torch.dtype, masks: Masks | None = None) -> list[_Run]:
    """Neighbouring non-empty key blocks of query block ``i``, merged into as few fused calls as is cheap.

    A span of neighbouring blocks is one call when its mask would be small (the kernel then skips nothing
    but also merges nothing); a long span is split where FULL and PARTIAL blocks alternate, so that no
    large mask is built for blocks that need none.
    """
    runs = []
    blocks = list(tiles.key_blocks(i))
    for _, span_items in groupby(enumerate(blocks), key=lambda item: item[1][0] - item[0]):
        span = [block for _, block in span_items]
        partial = [block[3] for block in span]
        if not any(partial) or (rows[1] - rows[0]) * (span[-1][2] - span[0][1]) <= MASK_LIMIT:
            runs.append(_Run(tiles, rows, span[0][1], span[-1][2], any(partial), dtype, masks))
            continue
        for kind, group in groupby(span, key=lambda block: block[3]):
            members = list(group)
            runs.append(_Run(tiles, rows, members[0][1], members[-1][2], kind, dtype, masks))
    return runs


GROUP_LIMIT = 1 << 22
"""Most scores (in elements) of the query blocks one fused call takes together (16 MiB of float32 masks)."""


def _groups(tiles: Tiles, dtype: torch.dtype) -> list[tuple[list[tuple[int, int]], list[tuple[_Run, ...]]]]:
    """The query blocks with at least one run, grouped by the shapes of their runs.

    Each group is ``(rows, columns)``: the query blocks ``(q0, q1)`` in order, and for each run position the
    run of every block. Blocks whose runs start at the same offset from the block and have the same lengths,
    kinds and mask shapes (a sliding window's blocks all do, past the first; so do the blocks at one place
    in equal documents) are done in one fused call per run position: fewer, larger calls, which the kernel
    spreads over the cores by batch and head. With evenly spaced blocks the group's queries, keys and values
    are strided views, never copies (:func:`_take`). A group is cut where its scores would pass
    :data:`GROUP_LIMIT`.
    """
    by_shape: dict[tuple[object, ...], list[tuple[tuple[int, int], list[_Run]]]] = {}
    shift_invariant = tiles.mask is None or getattr(tiles.mask, "shift_invariant", False)
    masks: Masks | None = {} if shift_invariant else None
    for i, q0, q1 in tiles.query_blocks():
        runs = _runs(tiles, i, (q0, q1), dtype, masks=masks)
        if runs:
            runs_at = ((r.k0 - q0, r.k1 - r.k0, r.is_causal, _shape(r.mask), _shape(r.row_ok)) for r in runs)
            shape = (q1 - q0, *runs_at)
            by_shape.setdefault(shape, []).append(((q0, q1), runs))
    groups = []
    for members in by_shape.values():
        (q0, q1), runs = members[0]
        scores = tiles.batch * tiles.heads * (q1 - q0) * sum(run.k1 - run.k0 for run in runs)
        size = max(1, GROUP_LIMIT // scores)
        for first in range(0, len(members), size):
            chunk = members[first : first + size]
            columns = [tuple(runs[position] for _, runs in chunk) for position in range(len(runs))]
            groups.append(([rows for rows, _ in chunk], columns))
    return groups


def _shape(tensor: Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def _view(x: Tensor, spans: list[tuple[int, int]]) -> Tensor | None:
    """``x (B, H, L, W)`` at rows ``[a, b)`` of each span as one view ``(m, H, b - a, W)`` where one exists.

    For one span, or for ``B = 1`` with evenly spaced spans (a window's blocks): the members are a dimension
    of stride ``step`` rows, overlapping where the windows do. ``None`` otherwise.
    """
    a, b = spans[0]
    if len(spans) == 1:
        return x[..., a:b, :]
    step = spans[1][0] - a
    if x.shape[0] != 1 or any(later[0] - earlier[0] != step for earlier, later in pairwise(spans)):
        return None
    strides = x.stride()
    return x.as_strided(
        (len(spans), x.shape[1], b - a, x.shape[3]),
        (step * strides[2], strides[1], strides[2], strides[3]),
        x.storage_offset() + a * strides[2],
    )


def _take(x: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """``x (B, H, L, W)`` at rows ``[a, b)`` of each span, ``(m * B, H, b - a, W)``, member by member: a view
    where :func:`_view` finds one, else a copy."""
    view = _view(x, spans)
    return torch.stack([x[..., a:b, :] for a, b in spans]).flatten(0, 1) if view is None else view


def _put(x: Tensor, spans: list[tuple[int, int]], rows: Tensor, *, add: bool = False) -> None:
    """Write (or with ``add``, add) ``rows (m * B, H, b - a, W)`` into ``x (B, H, L, W)`` at spans that do not
    overlap (query blocks): through one view where :func:`_view` finds one."""
    view = _view(x, spans)
    if view is None:
        (_add if add else _assign)(x, spans, rows)
    elif add:
        view += rows
    else:
        view.copy_(rows)


def _assign(x: Tensor, spans: list[tuple[int, int]], rows: Tensor) -> None:
    batch = x.shape[0]
    for member, (a, b) in enumerate(spans):
        x[..., a:b, :] = rows[member * batch : (member + 1) * batch]


def _stacked(tiles: list[Tensor], batch: int) -> Tensor:
    """One 4-D mask ``(B|1, H|1, t, s)`` per member -> one that broadcasts against ``(m * B, H, t, s)``."""
    first, distinct = tiles[0], list({id(tile): tile for tile in tiles}.values())  # shift-invariant: 1 or 2
    if first.shape[0] == 1 and all(torch.equal(tile, first) for tile in distinct[1:]):
        return first  # one mask for every member: a window's blocks past the first
    return torch.stack([tile.expand(batch, *tile.shape[1:]) for tile in tiles]).flatten(0, 1)


def _mask(runs: tuple[_Run, ...], batch: int) -> Tensor | None:
    """The mask of one fused call over the runs of a group (their masks have one shape, or all are None)."""
    tiles = [run.mask for run in runs if run.mask is not None]
    return _stacked(tiles, batch) if tiles else None


def _add(x: Tensor, spans: list[tuple[int, int]], rows: Tensor) -> None:
    """Add ``rows (m * B, H, b - a, W)`` into ``x (B, H, L, W)`` at the spans: through one view where they
    follow one another without overlapping (documents) and :func:`_view` finds one; through one view per
    stretch of ``step`` rows where they are evenly spaced ``step`` apart and overlap (a window's keys: the
    members' first ``step`` rows do not overlap, nor their next ``step``...); else one at a time.

    An in-place add through overlapping views is left to chance once PyTorch splits it over threads.
    """
    view = _view(x, spans) if _in_order(spans) else None
    if view is not None:
        view += rows
        return
    step = spans[1][0] - spans[0][0] if len(spans) > 1 else 0
    if step > 0 and _view(x, spans) is not None:  # B = 1, evenly spaced: the views below exist too
        width = spans[0][1] - spans[0][0]
        for start in range(0, width, step):
            stretch = [(a + start, min(a + start + step, b)) for a, b in spans]
            view = _view(x, stretch)
            assert view is not None and _in_order(stretch)
            view += rows[..., start : start + step, :]
        return
    batch = x.shape[0]
    for member, (a, b) in enumerate(spans):
        x[..., a:b, :] += rows[member * batch : (member + 1) * batch]


Plan = list[tuple[list[tuple[int, int]], list[tuple[_Run, ...]]]]
"""What :func:`_groups` returns: the fused calls of one attention call, the same for its backward pass."""


def plan(q: Tensor, k: Tensor, *, mask: AnyMask, causal: bool, block: int = BLOCK) -> Plan:
    """The grouped runs of attention of ``q (B, H, T, D)`` over ``k (B, H, S, D)`` with tiles of ``block``."""
    return _groups(Tiles(q, k, mask=mask, causal=causal, block_q=block, block_k=block), q.dtype)


_PLANS: weakref.WeakKeyDictionary[MaskDescription, dict[tuple[object, ...], Plan]] = weakref.WeakKeyDictionary()
PLANS_KEPT = 8
"""Plans kept per mask description (for as many shapes, dtypes, tile sizes and causal flags)."""


def _plan_for(q: Tensor, k: Tensor, mask: AnyMask, causal: bool, block: int) -> Plan:
    """:func:`plan`, remembered for a mask description object (:func:`selfattention.masks.remembered`): a
    model passes one description to every layer and step, and planning a 16,384-token window costs about
    a millisecond (a tenth of its forward pass)."""
    if not isinstance(mask, MaskDescription):
        return plan(q, k, mask=mask, causal=causal, block=block)
    entry = (tuple(q.shape), tuple(k.shape), causal, block, q.dtype, str(q.device), MASK_LIMIT, GROUP_LIMIT)
    return remembered(_PLANS, mask, entry, lambda: plan(q, k, mask=mask, causal=causal, block=block), PLANS_KEPT)


def blocksparse_forward(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: AnyMask, causal: bool, block: int = BLOCK,
    groups: Plan | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(out, lse)`` of attention over the non-empty tiles only, for 4-D ``(B, H, T|S, D)`` inputs.

    ``groups``: :func:`plan`'s for these inputs, when made already (the backward pass takes the same).
    """
    forward, _ = _fused()
    groups = plan(q, k, mask=mask, causal=causal, block=block) if groups is None else groups
    work = checks.work_dtype(q.dtype)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=work, device=q.device)
    if sum(q1 - q0 for rows, _ in groups for q0, q1 in rows) < q.shape[-2]:  # query blocks with no key
        out.zero_()
        lse.fill_(-math.inf)
    batch = q.shape[0]
    once = _one_call(groups, batch)
    for rows, columns in groups:
        q_g = _take(q, rows)  # (m * B, H, bq, D): the group's query blocks, member by member

        def part(runs: tuple[_Run, ...], q_g: Tensor = q_g) -> tuple[Tensor, Tensor]:
            spans = [(run.k0, run.k1) for run in runs]
            part_out, part_lse = forward(q_g, _take(k, spans), _take(v, spans), 0.0, runs[0].is_causal,
                                         attn_mask=_mask(runs, batch), scale=scale)  # fmt: skip
            row_ok = [run.row_ok for run in runs if run.row_ok is not None]
            if row_ok:  # the kernel reports lse 0 for a row with no allowed key
                part_lse = torch.where(_stacked(row_ok, batch)[..., 0], part_lse, -math.inf)
            return part_out.to(work), part_lse  # the kernel's lse is in the work dtype already

        merged = reduce(lambda a, b: merge_partials(*a, *b), map(part, columns))
        whole = [_as_sequence(x, rows, q.shape[-2]) for x in (merged[0], merged[1].unsqueeze(-1))] if once else []
        if whole and whole[0] is not None and whole[1] is not None:  # the kernel's memory is the output: no copy
            return whole[0].to(q.dtype), whole[1][..., 0]
        _put(out, rows, merged[0])  # out takes q's dtype
        _put(lse.unsqueeze(-1), rows, merged[1].unsqueeze(-1))  # (B, H, T, 1) as rows of width 1
    return out, lse


def blocksparse_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, *, scale: float,
    mask: AnyMask, causal: bool, block: int = BLOCK, groups: Plan | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dq, dk, dv)``: the fused backward of every run, given the merged ``out`` and ``lse``."""
    _, backward = _fused()
    groups = plan(q, k, mask=mask, causal=causal, block=block) if groups is None else groups
    work = checks.work_dtype(q.dtype)
    # a row with no key: weights exp(-inf) = 0; the kernel takes lse in the work dtype
    lse = torch.where(torch.isfinite(lse), lse, math.inf).to(work).unsqueeze(-1)  # (B, H, T, 1)
    grad_out = grad_out.to(q.dtype).contiguous()
    # Where the runs' rows tile the whole sequence once (documents aligned to the blocks), each gradient row
    # has one contribution: it is written into uninitialised memory instead of added to zeros.
    query_spans = [span for rows, columns in groups for span in rows for _ in columns]
    key_spans = [(run.k0, run.k1) for _, columns in groups for runs in columns for run in runs]
    assign_q, assign_k = _tiles_once(query_spans, q.shape[-2]), _tiles_once(key_spans, k.shape[-2])
    dq = _gradient_buffer(q.shape, work, q.device, assign_q)
    dk, dv = (_gradient_buffer(x.shape, work, q.device, assign_k) for x in (k, v))
    batch = q.shape[0]
    once = _one_call(groups, batch)
    for rows, columns in groups:
        q_g, out_g, do_g = _take(q, rows), _take(out, rows), _take(grad_out, rows)
        lse_g = _take(lse, rows)[..., 0]  # (m * B, H, bq)
        for runs in columns:
            spans = [(run.k0, run.k1) for run in runs]
            dq_r, dk_r, dv_r = backward(do_g, q_g, _take(k, spans), _take(v, spans), out_g, lse_g, 0.0,
                                        runs[0].is_causal, attn_mask=_mask(runs, batch), scale=scale)  # fmt: skip
            if once:  # one fused call; where it covered every query and key once, its memory is the gradient
                whole = (
                    _as_sequence(dq_r, rows, q.shape[-2]),
                    *(_as_sequence(x, spans, k.shape[-2]) for x in (dk_r, dv_r)),
                )
                if all(x is not None for x in whole):
                    return tuple(x.to(y.dtype) for x, y in zip(whole, (q, k, v), strict=True))  # type: ignore[return-value,union-attr]
            _put(dq, rows, dq_r, add=not assign_q)
            write = _put if assign_k else _add
            write(dk, spans, dk_r)
            write(dv, spans, dv_r)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _one_call(groups: Plan, batch: int) -> bool:
    """Whether the plan is one fused call (one group, one run position) over a batch of one: then
    :func:`_as_sequence` may find its results to be the whole output and gradients."""
    return batch == 1 and len(groups) == 1 and len(groups[0][1]) == 1


def _as_sequence(parts: Tensor, spans: list[tuple[int, int]], length: int) -> Tensor | None:
    """The results ``parts (m, H, L, W)`` of the spans ``(0, L), (L, 2L), ...`` covering ``[0, length)``, as one
    ``(1, H, length, W)`` view of their memory: where the kernel laid the members out one after another
    (member stride ``L`` times the row stride), as it does for inputs that are such views. ``None`` otherwise.
    """
    members, heads, rows, width = parts.shape
    if members * rows != length or spans != [(i * rows, (i + 1) * rows) for i in range(members)]:
        return None
    member_step, head_step, row_step, column_step = parts.stride()
    if members > 1 and member_step != rows * row_step:
        return None
    shape, strides = (1, heads, length, width), (members * member_step, head_step, row_step, column_step)
    return parts.as_strided(shape, strides, parts.storage_offset())


def _in_order(spans: list[tuple[int, int]]) -> bool:
    """Whether each span ends at or before the next one starts: no overlap, in this order."""
    return all(end <= start for (_, end), (start, _) in pairwise(spans))


def _tiles_once(spans: list[tuple[int, int]], length: int) -> bool:
    """Whether ``spans`` cover ``[0, length)`` exactly once (in any order)."""
    return sum(b - a for a, b in spans) == length and _in_order(sorted(spans))


def _gradient_buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device, assigned: bool) -> Tensor:
    """Where a gradient is summed: zeros, or uninitialised memory when every row is assigned once."""
    return (torch.empty if assigned else torch.zeros)(shape, dtype=dtype, device=device)


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
    block: int | None = None,
) -> tuple[Tensor, None]:
    """The backend function: fused-kernel tiles with a recomputing backward (no dropout, no weights)."""
    assert dropout_p == 0 and not return_weights, "checked by choose_backend"
    if query.device.type != "cpu":  # the fused operator below is the CPU's; FlexAttention's kernels on a GPU
        return flex.attention(query, key, value, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p,
                              return_weights=return_weights)  # fmt: skip
    return attention_with_lse(query, key, value, mask=mask, causal=causal, scale=scale, block=block)[0], None


def attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, *, mask: AnyMask, causal: bool, scale: float, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(context, lse)`` on the CPU: the backend's output and the merged log-sum-exp of its runs."""
    if not query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:  # the kernel would read out of bounds
        raise ValueError(
            f"the blocksparse kernel needs equal leading dimensions, got query {tuple(query.shape)}, key "
            f"{tuple(key.shape)}, value {tuple(value.shape)}; selfattention.attention broadcasts them"
        )
    # The kernel takes one head width: zero columns added to q and k leave the scores as they are, zero
    # columns added to v give output columns that are cut off again.
    width = max(query.shape[-1], value.shape[-1])
    q, k, v = (as_4d(_widened(tensor, width)) for tensor in (query, key, value))
    mask = _mask_as_4d(mask, query)
    block = block or block_size(mask)
    groups = _plan_for(q, k, mask, causal, block)  # once, for both passes
    options = {"scale": scale, "mask": mask, "causal": causal, "block": block, "groups": groups}
    context, lse = recompute_attention(
        q, k, v, forward=blocksparse_forward, backward=blocksparse_backward, options=options
    )
    context = context[..., : value.shape[-1]]
    return context.reshape(*query.shape[:-1], value.shape[-1]), lse.reshape(query.shape[:-1])


def _widened(tensor: Tensor, width: int) -> Tensor:
    """``tensor (..., L, W)`` with zero columns up to ``width``."""
    extra = width - tensor.shape[-1]
    return torch.nn.functional.pad(tensor, (0, extra)) if extra else tensor
