"""Conversion between :class:`~selfattention.modules.MultiHeadAttention` and ``torch.nn.MultiheadAttention``.

Weights are copied both ways, so the two modules compute the same outputs. PyTorch's module stacks
``W^Q, W^K, W^V`` in one ``in_proj_weight (3C, C)``; ours keeps three ``nn.Linear`` layers (layout
``(out, in)`` in both). Masks are not converted: PyTorch's ``key_padding_mask`` is ``True`` = ignore, ours
``True`` = may attend, so pass ``~mask`` across.

This module imports no other module of the package: :class:`MultiHeadAttention` calls it, not the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from selfattention.modules import MultiHeadAttention

Ours = TypeVar("Ours", bound="MultiHeadAttention")


def from_torch(
    module: nn.MultiheadAttention,
    into: type[Ours],
    *,
    causal: bool = False,
    context_length: int | None = None,
    backend: str = "auto",
) -> Ours:
    """A module of class ``into`` with the weights of ``module`` (copied), computing the same outputs.

    PyTorch's module is not causal unless given a mask, hence ``causal=False`` by default. Its
    ``batch_first=False`` layout is ``(T, B, C)``; ours always takes ``(B, T, C)``.

    Raises:
        ValueError: for configurations ``into`` does not have: different key/value widths
            (``kdim``/``vdim``), ``add_bias_kv`` or ``add_zero_attn``.
    """
    if not module._qkv_same_embed_dim:
        raise ValueError(
            f"only self-attention with kdim == vdim == embed_dim ({module.embed_dim}) converts; "
            f"got kdim={module.kdim}, vdim={module.vdim}"
        )
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("add_bias_kv and add_zero_attn have no counterpart in MultiHeadAttention")
    width = module.embed_dim
    weight = module.in_proj_weight
    bias = module.in_proj_bias
    ours = into(
        width,
        width,
        context_length,
        module.dropout,
        module.num_heads,
        qkv_bias=bias is not None,
        causal=causal,
        backend=backend,
        out_bias=module.out_proj.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    linears = (ours.W_query, ours.W_key, ours.W_value)
    with torch.no_grad():
        # in_proj_weight stacks W^Q, W^K, W^V: (3C, C) -> three (C, C) blocks, Linear layout (out, in)
        for linear, w in zip(linears, weight.chunk(3), strict=True):
            linear.weight.copy_(w)
        if bias is not None:
            for linear, b in zip(linears, bias.chunk(3), strict=True):
                linear.bias.copy_(b)
        ours.out_proj.weight.copy_(module.out_proj.weight)
        if module.out_proj.bias is not None:
            ours.out_proj.bias.copy_(module.out_proj.bias)
    return ours.train(module.training)


def to_torch(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    """A ``torch.nn.MultiheadAttention(batch_first=True)`` with the weights of ``ours`` (copied).

    PyTorch's module has one ``bias`` switch for the input and output projections; a missing bias on
    either side becomes zeros there, which computes the same thing. Causality is not part of PyTorch's
    module: pass ``attn_mask`` (``True`` = ignore) or ``is_causal`` to its forward.

    Raises:
        ValueError: for configurations PyTorch's module does not have: ``d_in != d_out``,
            ``num_kv_heads != num_heads``, or a custom ``scale``.
    """
    if ours.d_in != ours.d_out or ours.num_kv_heads != ours.num_heads or ours.scale is not None:
        raise ValueError(
            "torch.nn.MultiheadAttention needs d_in == d_out, num_kv_heads == num_heads and the default "
            f"scale; got d_in={ours.d_in}, d_out={ours.d_out}, num_heads={ours.num_heads}, "
            f"num_kv_heads={ours.num_kv_heads}, scale={ours.scale}"
        )
    linears = (ours.W_query, ours.W_key, ours.W_value)
    has_bias = linears[0].bias is not None or ours.out_proj.bias is not None
    weight = ours.W_query.weight
    module = nn.MultiheadAttention(
        ours.d_out,
        ours.num_heads,
        dropout=ours.dropout,
        bias=has_bias,
        batch_first=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.cat([linear.weight for linear in linears]))
        module.out_proj.weight.copy_(ours.out_proj.weight)
        if has_bias:
            zeros = torch.zeros_like(weight[:, 0])
            module.in_proj_bias.copy_(torch.cat([lin.bias if lin.bias is not None else zeros for lin in linears]))
            out_bias = ours.out_proj.bias
            module.out_proj.bias.copy_(out_bias if out_bias is not None else zeros)
    return module.train(ours.training)
