"""The ``"sdpa"`` backend: PyTorch's fused :func:`torch.nn.functional.scaled_dot_product_attention`.

Two adjustments keep it equal to the reference: the causal mask is aligned bottom-right (PyTorch aligns
top-left when ``T != S``), and a query whose keys are all masked gets zeros instead of NaN: such rows are
unmasked for the kernel and their output multiplied by zero, which also zeroes their gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfattention.backends.math import combined_mask


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    return_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run the fused kernel; only a causal call with ``T == S`` and no other mask avoids building a mask."""
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    # grouped key/value heads (G < H), as attention() passes them on the CPU: the kernel maps the heads itself
    gqa = query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]
    if mask is None and (not causal or num_queries == num_keys):
        context = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=causal and num_queries > 0, scale=scale, enable_gqa=gqa
        )
        return context, None
    mask = combined_mask(mask, causal, num_queries, num_keys, query.device)
    assert mask is not None
    if mask.dtype == torch.bool:
        row_ok = mask.any(dim=-1, keepdim=True)  # (..., T, 1): rows with at least one key
        mask = mask | ~row_ok
    else:
        row_ok = (mask > float("-inf")).any(dim=-1, keepdim=True)
        mask = torch.where(row_ok, mask, torch.zeros_like(mask)).to(query.dtype)
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )
    if not bool(row_ok.all()):
        context = context * row_ok.to(context.dtype)
    return context, None
