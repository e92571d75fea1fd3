"""Tiles of one attention call: which (query block, key block) pairs have work, and the mask of each.

Shared by the ``"tiled"`` and ``"blocksparse"`` backends. A :class:`Tiles` cuts ``T`` queries into blocks
of ``block_q`` and ``S`` keys into blocks of ``block_k`` (the last block of each may be shorter), and
classifies every pair as EMPTY (skipped), FULL (no mask needed) or PARTIAL (masked), from

* ``causal``: the bottom-right causal mask over this call's own ``T`` and ``S``;
* ``mask``: a boolean (``True`` = may attend) or float (added) tensor broadcastable to ``(..., T, S)``,
  whose tiles are all PARTIAL unless causal empties them; or a :class:`~selfattention.masks.MaskDescription`,
  evaluated at global positions ``q_offset + i`` and ``kv_offset + j`` of a sequence of ``total``
  = ``(T_total, S_total)`` positions (default: this call is the whole sequence).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from selfattention import masks
from selfattention.masks import EMPTY, FULL, PARTIAL, MaskDescription

AnyMask = Tensor | MaskDescription | None


def batch_and_heads(query: Tensor) -> tuple[int, int]:
    """``(B, H)`` of ``query (..., H, T, D)``: heads is dim -3, batch is all dims before it flattened."""
    heads = query.shape[-3] if query.dim() >= 3 else 1
    batch = math.prod(query.shape[:-3]) if query.dim() >= 4 else 1
    return batch, heads


def to_rank(tile: Tensor, query: Tensor) -> Tensor:
    """Reshape a 4-D ``(B|1, H|1, t, s)`` tile so that it broadcasts against ``query``'s leading dims."""
    rank = query.dim()
    if rank == 4:
        return tile
    if rank < 4:
        return tile.reshape(tile.shape[4 - rank :]) if rank > 2 else tile[0, 0]
    lead = query.shape[:-3] if tile.shape[0] > 1 else (1,) * (rank - 3)
    return tile.reshape(*lead, *tile.shape[1:])


class Tiles:
    """The tile grid of one call and the mask of each tile (see the module docstring)."""

    def __init__(
        self,
        query: Tensor,
        key: Tensor,
        *,
        mask: AnyMask,
        causal: bool,
        block_q: int,
        block_k: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        total: tuple[int, int] | None = None,
    ):
        if block_q < 1 or block_k < 1:
            raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
        self.query, self.num_queries, self.num_keys = query, query.shape[-2], key.shape[-2]
        self.block_q, self.block_k, self.causal = block_q, block_k, causal
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.total = total or (q_offset + self.num_queries, kv_offset + self.num_keys)
        self.batch, self.heads = batch_and_heads(query)
        self.mask = mask
        if isinstance(mask, Tensor):
            lead = mask.shape[:-2]
            self.mask = mask.expand(*lead, self.num_queries, self.num_keys)
        self.kinds = self._classify()
        self._rows = self.kinds.tolist()  # plain lists: the loops below index them once per tile

    def _classify(self) -> Tensor:
        nq = -(-self.num_queries // self.block_q)
        nk = -(-self.num_keys // self.block_k)
        kinds = torch.full((nq, nk), FULL, dtype=torch.int8)
        if self.causal:
            kinds = masks.causal().block_map(1, 1, self.num_queries, self.num_keys, self.block_q, self.block_k)
        if isinstance(self.mask, MaskDescription):
            described = self.mask.block_map(
                self.batch,
                self.heads,
                *self.total,
                self.block_q,
                self.block_k,
                q_range=(self.q_offset, self.q_offset + self.num_queries),
                kv_range=(self.kv_offset, self.kv_offset + self.num_keys),
            )
            kinds = torch.minimum(kinds, described)
        elif self.mask is not None:
            kinds = torch.minimum(kinds, torch.tensor(PARTIAL, dtype=torch.int8))
        return kinds

    def query_blocks(self) -> Iterator[tuple[int, int, int]]:
        """``(i, q_start, q_end)`` for every query block, in local positions."""
        for i, start in enumerate(range(0, self.num_queries, self.block_q)):
            yield i, start, min(start + self.block_q, self.num_queries)

    def key_blocks(self, i: int) -> Iterator[tuple[int, int, int, bool]]:
        """``(j, k_start, k_end, partial)`` for every non-empty key block of query block ``i``."""
        for j, kind in enumerate(self._rows[i]):
            if kind != EMPTY:
                start = j * self.block_k
                yield j, start, min(start + self.block_k, self.num_keys), kind == PARTIAL

    def tile_mask(self, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor | None:
        """The mask of local queries ``rows`` by keys ``cols``: boolean, float (added) or None (no mask).

        Broadcastable to ``(..., rows, cols)`` against the query's leading dimensions.
        """
        (q0, q1), (k0, k1) = rows, cols
        tile: Tensor | None = None
        if isinstance(self.mask, Tensor):
            tile = self.mask[..., q0:q1, k0:k1]
        elif isinstance(self.mask, MaskDescription):
            described = self.mask.block(
                self.batch,
                self.heads,
                (self.q_offset + q0, self.q_offset + q1),
                (self.kv_offset + k0, self.kv_offset + k1),
                *self.total,
                device=self.query.device,
            )
            tile = to_rank(described, self.query)
        if self.causal:
            shift = self.num_keys - self.num_queries
            rows_at = torch.arange(q0, q1, device=self.query.device).unsqueeze(-1)
            allowed = torch.arange(k0, k1, device=self.query.device) <= rows_at + shift
            if tile is None or tile.dtype == torch.bool:
                tile = allowed if tile is None else tile & allowed
            else:
                tile = tile.masked_fill(~allowed, -math.inf)
        return tile

    def indices(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(b, h, q_idx, kv_idx)`` index tensors of a tile for ``score_mod`` (global positions).

        Shaped to broadcast against the scores ``(..., rows, cols)``: b over the flattened batch, h over
        the heads (both 0 when the query has no such dimension).
        """
        device = self.query.device
        b = to_rank(torch.arange(self.batch, device=device).view(-1, 1, 1, 1), self.query)
        h = to_rank(torch.arange(self.heads, device=device).view(1, -1, 1, 1), self.query)
        q_idx = torch.arange(self.q_offset + rows[0], self.q_offset + rows[1], device=device).unsqueeze(-1)
        kv_idx = torch.arange(self.kv_offset + cols[0], self.kv_offset + cols[1], device=device)
        return b, h, q_idx, kv_idx


def materialize_mask(mask: MaskDescription, query: Tensor, num_keys: int) -> Tensor:
    """The boolean tensor of a mask description for ``query (..., H, T, D)``, broadcastable to the scores.

    The description's ``b`` indexes the dimensions before ``H`` flattened, ``h`` indexes ``H``.
    """
    batch, heads = batch_and_heads(query)
    tensor = mask.materialize(batch, heads, query.shape[-2], num_keys, device=query.device)
    return to_rank(tensor, query)


def as_4d(tensor: Tensor) -> Tensor:
    """``(..., H, L, W)`` -> ``(B, H, L, W)`` with B the leading dims flattened (1 when absent)."""
    if tensor.dim() == 4:
        return tensor
    if tensor.dim() < 4:
        return tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))
    return tensor.reshape(-1, *tensor.shape[-3:])


def apply_mask(scores: Tensor, tile: Tensor | None) -> Tensor:
    """Scores with a tile's mask applied: -inf where a boolean mask forbids, a float mask added."""
    if tile is None:
        return scores
    if tile.dtype == torch.bool:
        return scores.masked_fill(~tile, -math.inf)
    return scores + tile.to(scores.dtype)
