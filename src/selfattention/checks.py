"""Input checks shared by the library and the command line. Each raises one clear error naming the values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattention.masks import MaskDescription


def floating(name: str, tensor: Tensor) -> None:
    """Raise TypeError unless ``tensor`` is a floating-point tensor with at least two dimensions."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() < 2:
        raise ValueError(f"{name} must have shape (..., length, width), got {tuple(tensor.shape)}")


def finite(name: str, tensor: Tensor) -> None:
    """Raise ValueError naming the first non-finite entry of ``tensor``."""
    # Fast path, one reduction: a finite sum means every entry is finite (an inf or NaN anywhere makes the sum
    # inf or NaN). A non-finite sum can also come from large finite entries overflowing; then look entry by entry.
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} contains a non-finite value {tensor[index].item()} at index {index}")


def overflowed(name: str, tensor: Tensor) -> None:
    """Raise ValueError when a result computed from finite inputs is not finite: the scores overflowed."""
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{name} is not finite although the inputs are: the scores overflowed {tensor.dtype} "
            "(inputs too large); scale the inputs down or compute in float64"
        )


def same_width(queries: Tensor, keys: Tensor) -> None:
    """Raise ValueError unless queries and keys have the same last dimension."""
    if queries.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"query width ({queries.shape[-1]}) must equal key width ({keys.shape[-1]}): "
            f"queries {tuple(queries.shape)}, keys {tuple(keys.shape)}"
        )


def qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Check the inputs of :func:`selfattention.attention`: dtypes, widths, lengths and finiteness."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        floating(name, tensor)
    same_width(query, key)
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length: key {tuple(key.shape)}, value {tuple(value.shape)}")
    if key.shape[:-2] != value.shape[:-2]:
        raise ValueError(
            f"key and value must have the same leading dimensions: key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        finite(name, tensor)


def mask(mask: Tensor | MaskDescription, target: tuple[int, ...]) -> None:
    """Raise unless ``mask`` is boolean or float and broadcasts to ``target`` (``(..., T, S)``).

    A mask description is checked against the batch (all dims before ``H``), heads, ``T`` and ``S``.
    """
    if isinstance(mask, MaskDescription):
        heads = target[-3] if len(target) >= 3 else 1
        mask.check(math.prod(target[:-3]), heads, target[-2], target[-1])
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or a mask description, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be boolean (True = may attend) or float (added to the scores), got dtype {mask.dtype}"
        )
    if mask.dim() > len(target) or mask.dim() < 2:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the scores {target}")
    for size, want in zip(reversed(mask.shape), reversed(target), strict=False):
        if size not in (1, want):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the scores {target}")
    if mask.is_floating_point() and bool((torch.isnan(mask) | (mask == math.inf)).any()):
        raise ValueError("float mask contains NaN or +inf (use -inf to forbid a pair, finite values to bias it)")


def scale(value: float | None) -> None:
    """Raise ValueError unless the score scale is ``None`` or a finite number."""
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"scale must be a finite number (or None for 1/sqrt(D)), got {value}")


def dropout(p: float) -> None:
    """Raise ValueError unless ``0 <= p < 1``."""
    if not (isinstance(p, int | float) and math.isfinite(p) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
