"""``"blocksparse"`` on the GPU: PyTorch's FlexAttention, compiled, driven by our own tile classification.

The CPU ``"blocksparse"`` backend calls a CPU-only operator. On CUDA the same idea (compute only the tiles
a mask leaves non-empty, never build a ``(T, S)`` mask) is what FlexAttention's compiled kernels do, so
``"blocksparse"`` hands CUDA inputs to :func:`attention` here. Two pieces make the call:

* a :class:`~torch.nn.attention.flex_attention.BlockMask` built by :func:`block_mask` from
  :class:`~selfattention.backends.tiles.Tiles`, the classification ``"tiled"`` and ``"blocksparse"``
  already use: EMPTY tiles are left out, FULL tiles run without a mask, PARTIAL tiles evaluate the
  ``mask_mod``. No ``(T, S)`` tensor is evaluated to find the tiles (``create_block_mask`` would
  evaluate the rule at every pair; our descriptions classify tiles from their bounds);
* the ``mask_mod``: :meth:`~selfattention.masks.MaskDescription.mask_mod` of the description, and the
  bottom-right causal rule for ``causal=True``.

FlexAttention gives a zero output (and zero gradients) to a query with no allowed key, as the reference
does. Gradients come from FlexAttention's own compiled backward.

What the compiled kernel cannot take goes to the device-generic ``"tiled"`` backend instead, with the
same tiles and the same memory bound: inputs not on CUDA, float64 (the compiled kernels are built and
tested for half, bfloat16 and float32), head widths below 16 (``tl.dot``'s smallest) and empty
sequences. A tensor mask is dense already: it goes to ``"sdpa"``, the fused kernel that takes it as it is;
so does a call of at most ``SMALL`` (256²) pairs, such as one decoding step, with its mask materialised
(one tile, nothing to skip, and no compilation per shape; ``"auto"`` itself materialises up to 512², on any
device).
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selfattention.backends import sdpa, tiled
from selfattention.backends.tiles import AnyMask, Tiles, as_4d, materialize_mask
from selfattention.masks import FULL, PARTIAL, MaskDescription, MaskFn, remembered
from selfattention.masks import causal as causal_rule

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

BLOCK = 128
"""Tile size of the block mask (FlexAttention's default, which its CUDA kernels are tuned for)."""
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes sent to the compiled kernel."""
MIN_WIDTH = 16
"""Smallest head width (D and E) the compiled CUDA kernel takes."""
SMALL = 256 * 256
"""``T * S`` up to which the fused SDPA kernel takes the call with its mask materialised."""


def supported(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """True when FlexAttention's compiled CUDA kernel takes these ``(B, H, T|S, D|E)`` inputs."""
    return (
        query.device.type == "cuda"
        and query.dtype in DTYPES
        and min(query.shape[-1], value.shape[-1]) >= MIN_WIDTH
        and min(query.shape[-2], key.shape[-2]) > 0
    )


def mask_mod(mask: MaskDescription | None, causal: bool, num_queries: int, num_keys: int, device: Any) -> MaskFn | None:
    """``mask`` and the bottom-right causal rule together, as one FlexAttention ``mask_mod`` (None: no rule)."""
    rules = [rule.mask_mod(num_queries, num_keys, device) for rule in (mask,) if rule is not None]
    if causal:
        rules.append(causal_rule().mask_mod(num_queries, num_keys, device))
    if len(rules) < 2:
        return rules[0] if rules else None
    first, second = rules
    return lambda b, h, q, kv: first(b, h, q, kv) & second(b, h, q, kv)


def block_mask(
    query: Tensor, key: Tensor, *, mask: MaskDescription | None, causal: bool, block: int = BLOCK
) -> BlockMask:
    """The FlexAttention block mask of ``mask`` (and ``causal``) for 4-D ``query`` and ``key``.

    Tiles are classified once for all batch rows and heads (conservatively: FULL only where full for all,
    EMPTY only where empty for all), so the block mask has batch and head size 1 and broadcasts.
    """
    from torch.nn.attention.flex_attention import BlockMask

    num_queries, num_keys = query.shape[-2], key.shape[-2]
    kinds = Tiles(query, key, mask=mask, causal=causal, block_q=block, block_k=block).kinds.to(query.device)
    partial, full = kinds == PARTIAL, kinds == FULL  # (nq, nk)

    def listed(chosen: Tensor) -> tuple[Tensor, Tensor]:
        # per query block: how many key blocks, and their indices first (stable: in key order)
        count = chosen.sum(-1, dtype=torch.int32)
        order = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return count[None, None], order[None, None]  # (1, 1, nq), (1, 1, nq, nk)

    kv_num_blocks, kv_indices = listed(partial)
    full_num_blocks, full_indices = listed(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_num_blocks,
        full_indices,
        BLOCK_SIZE=block,
        mask_mod=mask_mod(mask, causal, num_queries, num_keys, query.device),
        seq_lengths=(num_queries, num_keys),
    )


_BLOCK_MASKS: weakref.WeakKeyDictionary[MaskDescription, dict[tuple[object, ...], BlockMask]] = (
    weakref.WeakKeyDictionary()
)
CACHED = 8
"""Block masks kept per mask description (for as many shapes, devices and causal flags)."""


def cached_block_mask(query: Tensor, key: Tensor, *, mask: MaskDescription | None, causal: bool) -> BlockMask:
    """:func:`block_mask`, remembered for the same description object, shapes, device and ``causal``.

    A model passes one description to every layer and a training loop to every step: the classification,
    the block lists and the ``mask_mod`` are made once instead of on every call. A description that changes
    (ids edited in place: :meth:`~selfattention.masks.MaskDescription.version`) gets a new one; a
    ``from_function`` rule, whose inputs cannot be seen, is never cached. Entries go with their description.
    """
    if mask is None:
        return block_mask(query, key, mask=mask, causal=causal)
    # B and H too: a per-row rule (documents, padding) is classified over the batch
    entry = (tuple(query.shape[:-1]), key.shape[-2], causal, str(query.device))
    return remembered(_BLOCK_MASKS, mask, entry, lambda: block_mask(query, key, mask=mask, causal=causal), CACHED)


@functools.cache
def compiled_flex_attention() -> Any:
    """``torch.compile(flex_attention)``, made once: without compiling, FlexAttention builds every score."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_forward(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: MaskDescription | None, causal: bool, compiled: bool = True
) -> Tensor:
    """FlexAttention over the tiles of ``mask`` for 4-D ``(B, H, T|S, D|E)`` inputs; differentiable on CUDA.

    ``compiled=False`` runs FlexAttention's eager reference instead (every score; for tests on the CPU,
    where the same block mask and mask_mod are checked without a GPU).
    """
    from torch.nn.attention.flex_attention import flex_attention

    blocks = cached_block_mask(q, k, mask=mask, causal=causal)
    run = compiled_flex_attention() if compiled else flex_attention
    return run(q, k, v, block_mask=blocks, scale=scale)


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
) -> tuple[Tensor, None]:
    """The ``"blocksparse"`` backend function for inputs not on the CPU (see the module docstring)."""
    assert dropout_p == 0 and not return_weights, "checked by choose_backend"
    if isinstance(mask, MaskDescription) and query.shape[-2] * key.shape[-2] <= SMALL:
        mask = materialize_mask(mask, query, key.shape[-2])
    if isinstance(mask, Tensor) or (mask is None and query.shape[-2] * key.shape[-2] <= SMALL):
        context, _ = sdpa.attention(query, key, value, mask=mask, causal=causal, scale=scale, dropout_p=0.0,
                                    return_weights=False)  # fmt: skip
        return context, None
    q, k, v = as_4d(query), as_4d(key), as_4d(value)
    if not supported(q, k, v):
        return tiled.attention(query, key, value, mask=mask, causal=causal, scale=scale, dropout_p=0.0,
                               return_weights=False)  # fmt: skip
    context = flex_forward(q, k, v, scale=scale, mask=mask, causal=causal)
    return context.reshape(*query.shape[:-1], value.shape[-1]), None
