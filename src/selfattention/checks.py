"""Input checks shared by the library and the command line. Each raises one clear error naming the values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattention.masks import MaskDescription

LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Dtypes that attention computes in float32 (see :func:`work_dtype`)."""


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
    if math.isfinite(tensor.sum().item()):  # a Python test of the sum: a quarter of the time of isfinite() + bool()
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} contains a non-finite value {tensor[index].item()} at index {index}")


def overflowed(name: str, tensor: Tensor) -> None:
    """Raise ValueError when a result computed from finite inputs is not finite: the scores overflowed."""
    if not math.isfinite(tensor.sum().item()) and not bool(torch.isfinite(tensor).all()):
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


def qkv(
    query: Tensor, key: Tensor, value: Tensor, bounds: tuple[float, float, float] | None = None
) -> tuple[float, float, float]:
    """Check the inputs of :func:`selfattention.attention`: types, dtypes, widths, lengths and finiteness.

    The whole input contract is written down in ``docs/input-contract.md``; :func:`leading` checks the
    leading (batch and head) dimensions and :func:`magnitudes` the overflow limits.

    Args:
        bounds: finite upper bounds on ``max |query|``, ``max |key|``, ``max |value|`` that the caller
            already established (a module whose KV cache checked every entry as it was written); the
            tensors are then not scanned again. Anything else (a NaN, an infinity, a negative number) is
            refused.

    Returns:
        The largest absolute entry of query, key and value (one reduction each, which also shows they are
        finite), or ``bounds``, for :func:`magnitudes`.
    """
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        floating(name, tensor)
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value must have the same dtype, got query {query.dtype}, key {key.dtype}, "
            f"value {value.dtype}"
        )
    if not query.device == key.device == value.device:
        raise ValueError(
            f"query, key and value must be on the same device, got query {query.device}, key {key.device}, "
            f"value {value.device}"
        )
    same_width(query, key)
    if query.shape[-1] == 0:
        raise ValueError(
            f"query and key width must be at least 1, got 0: queries {tuple(query.shape)}, keys {tuple(key.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length: key {tuple(key.shape)}, value {tuple(value.shape)}")
    if key.shape[:-2] != value.shape[:-2]:
        raise ValueError(
            f"key and value must have the same leading dimensions: key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if bounds is not None:
        if len(bounds) != 3 or not all(math.isfinite(b) and b >= 0 for b in bounds):
            raise ValueError(f"bounds must be three finite numbers >= 0 (max |q|, |k|, |v|), got {bounds}")
        return bounds
    largest_query, largest_key, largest_value = largest_finite(query=query, key=key, value=value)
    return largest_query, largest_key, largest_value


def largest_finite(**tensors: Tensor) -> tuple[float, ...]:
    """``max |tensor|`` of each named tensor, in order; raise ValueError naming the first non-finite entry.

    One reduction per tensor both bounds the entries (for :func:`magnitudes`) and shows they are finite.
    """
    largest = _largest(*tensors.values())
    for (name, tensor), found in zip(tensors.items(), largest, strict=True):
        if not math.isfinite(found):
            finite(name, tensor)  # names the first non-finite entry
    return largest


def leading(query: Tensor, key: Tensor) -> tuple[int, ...]:
    """The leading dimensions ``(..., H)`` of the scores, from ``query (..., H, T, D)`` and ``key (..., G, S, D)``.

    The head dimension follows grouped-query attention: ``H % G == 0`` gives ``H`` heads (query head ``h``
    uses key head ``h // (H // G)``), and a single query head (``H == 1``) broadcasts to ``G``. The
    dimensions before it broadcast as in PyTorch (equal, or one of them 1); a missing dimension counts as 1.

    Raises:
        ValueError: naming both shapes, when the heads or the batch dimensions do not fit.
    """
    q_lead, k_lead = tuple(query.shape[:-2]), tuple(key.shape[:-2])
    if not q_lead and not k_lead:
        return ()
    rank = max(len(q_lead), len(k_lead))
    q_lead, k_lead = (1,) * (rank - len(q_lead)) + q_lead, (1,) * (rank - len(k_lead)) + k_lead
    heads, kv_heads = q_lead[-1], k_lead[-1]
    if kv_heads != 0 and heads % kv_heads == 0:
        out_heads = heads
    elif heads == 1 or (heads == 0 and kv_heads == 0):
        out_heads = kv_heads
    else:
        raise ValueError(
            f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}) for grouped-query attention"
        )
    if q_lead[:-1] == k_lead[:-1]:
        return (*q_lead[:-1], out_heads)
    try:
        batch = torch.broadcast_shapes(q_lead[:-1], k_lead[:-1])
    except RuntimeError:
        raise ValueError(
            f"the batch dimensions of query {tuple(query.shape)} and key/value {tuple(key.shape)} do not broadcast: "
            f"{q_lead[:-1]} against {k_lead[:-1]} (each pair must be equal or one of them 1)"
        ) from None
    return (*batch, out_heads)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention is computed in: float32 for half and bfloat16, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _largest(*tensors: Tensor) -> tuple[float, ...]:
    """``max |tensor|`` of each tensor as Python floats (0 for an empty one), without absolute-value copies.

    The extremes of all of them come back from the device in one transfer: on a GPU each read-back waits for
    every queued kernel, so one read instead of two per tensor. A broadcast view is read once: its dimensions
    of stride 0 are cut to one entry.
    """
    extremes: list[Tensor] = []
    for tensor in tensors:
        if tensor.numel():
            tensor = tensor.detach()
            if 0 in tensor.stride():  # indexing costs more than the reduction of a decoding step's few entries
                tensor = tensor[tuple(slice(0, 1) if step == 0 else slice(None) for step in tensor.stride())]
            extremes += torch.aminmax(tensor)
    on_cpu = not extremes or extremes[0].device.type == "cpu"  # the callers' tensors share one device
    found = iter([x.item() for x in extremes] if on_cpu else torch.stack(extremes).tolist())
    return tuple(max(-next(found), next(found)) if tensor.numel() else 0.0 for tensor in tensors)


def magnitudes(
    query: Tensor, key: Tensor, value: Tensor, scale: float, largest: tuple[float, float, float] | None = None
) -> None:
    """Raise ValueError when a backend could overflow the work dtype; every backend then refuses alike.

    Two limits, each a quarter or a half of the work dtype's largest number (float32 for half and
    bfloat16) so that sums and differences of in-range numbers stay finite:

    * the scores: ``|q·k|`` and ``|q·k · scale|`` up to a quarter of it (the fused kernels subtract row
      maxima: differences of two such scores are finite). The bound ``D · max|q| · max|k|`` decides most
      calls at once; only when it is exceeded are the scores computed, in float64, to decide exactly.
      Overflow to ``+inf`` and to ``-inf`` are refused alike (a row of ``-inf`` scores would otherwise
      look fully masked and return zeros).
    * the values: ``S · max|v|`` up to half of it (online softmax sums up to ``S`` weighted values
      before it divides).

    ``largest``: ``max |q|, max |k|, max |v|`` when already known (as :func:`qkv` returns them).
    """
    largest_query, largest_key, largest_value = largest or _largest(query, key, value)
    limit = torch.finfo(work_dtype(query.dtype)).max / 4
    num_keys = key.shape[-2]
    if num_keys * largest_value > 2 * limit:
        raise ValueError(
            f"value entries up to {largest_value:.3g} with {num_keys} keys could overflow "
            f"{work_dtype(query.dtype)} while the weighted values are summed; scale the values down "
            "(the output scales with them) or compute in float64"
        )
    factor = max(1.0, abs(scale))
    if query.shape[-1] * largest_query * largest_key * factor <= limit:
        return
    largest_score = _largest_score(query, key) * factor
    if not largest_score <= limit:
        raise ValueError(
            f"the scores overflowed {work_dtype(query.dtype)}: |q·k| reaches {largest_score:.3g} with scale "
            f"{scale:.3g}, beyond {limit:.3g}; scale the inputs down or compute in float64"
        )


def _largest_score(query: Tensor, key: Tensor) -> float:
    """``max |q·k|`` over every pair, computed in float64 a slice of queries at a time (float64 may give inf)."""
    query, key = query.detach(), key.detach()  # a bound, not part of the graph
    key64 = key.double().transpose(-2, -1)  # (..., D, S)
    if query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] not in (1, query.shape[-3]):
        key64 = key64.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)  # grouped heads: h -> h // (H/G)
    lead = max(math.prod(query.shape[:-2]), math.prod(key.shape[:-2]), 1)
    rows = max(1, (1 << 22) // max(1, key.shape[-2] * lead))
    largest = 0.0
    for start in range(0, query.shape[-2], rows):
        scores = query[..., start : start + rows, :].double() @ key64  # (..., rows, S)
        if scores.numel():
            found = float(scores.abs().amax())
            if not math.isfinite(found):  # inf, or NaN from inf - inf: overflowed even in float64
                return math.inf
            largest = max(largest, found)
    return largest


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
    """Raise unless the score scale is ``None`` or a finite number: TypeError for a bool, ValueError else."""
    if isinstance(value, bool):
        raise TypeError(f"scale must be a number (or None for 1/sqrt(D)), got the bool {value}")
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"scale must be a finite number (or None for 1/sqrt(D)), got {value}")


def dropout(p: float) -> None:
    """Raise ValueError unless ``0 <= p < 1``."""
    if not (isinstance(p, int | float) and math.isfinite(p) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
