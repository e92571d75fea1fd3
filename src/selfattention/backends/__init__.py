"""The attention backends, in one registry with one signature.

Every backend is a function::

    fn(query, key, value, *, mask, causal, scale, dropout_p, return_weights) -> (context, weights | None)

with query ``(..., H, T, D)``, key ``(..., H, S, D)`` and value ``(..., H, S, E)`` already checked and with
grouped key/value heads already expanded (see :func:`selfattention.functional.attention`). ``mask`` is
boolean (``True`` = may attend) or float (added), ``causal`` means the bottom-right causal mask, and
``scale`` is a number. Each backend is tested against ``"math"``, which is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from selfattention.backends import loop, matrix, sdpa, tiled

BackendFn = Callable[..., tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class Backend:
    """A named attention implementation and what it can do."""

    name: str
    fn: BackendFn
    returns_weights: bool
    supports_dropout: bool
    doc: str
    takes_mask_descriptions: bool = False
    """True: gets :class:`~selfattention.masks.MaskDescription` masks as they are (else materialised)."""
    supports_score_mod: bool = False


BACKENDS: dict[str, Backend] = {
    "loop": Backend("loop", loop.attention, True, False, "per-query Python loops, for reading"),
    "math": Backend("math", matrix.attention, True, True, "matrix form, the reference"),
    "sdpa": Backend("sdpa", sdpa.attention, False, True, "PyTorch's fused scaled_dot_product_attention"),
    "tiled": Backend(
        "tiled",
        tiled.attention,
        False,
        False,
        "flash-style online softmax over tiles in plain PyTorch, O(T + S) memory",
        takes_mask_descriptions=True,
        supports_score_mod=True,
    ),
}


def choose_backend(
    name: str,
    *,
    return_weights: bool,
    dropout_p: float,
    mask: object,
    causal: bool,
    score_mod: object = None,
    shape: tuple[int, int] | None = None,
) -> Backend:
    """Look up ``name`` in :data:`BACKENDS`, or pick one for ``"auto"``.

    ``"auto"`` takes the fused kernel (``"sdpa"``), the fastest on every shape we measured, unless the
    caller wants the weights back, which only an eager backend can give (then ``"math"``).

    Raises:
        ValueError: for an unknown name, or a backend that cannot do what the call asks.
    """
    if name == "auto":
        if score_mod is not None and not return_weights and dropout_p == 0:
            return BACKENDS["tiled"]
        return BACKENDS["math" if return_weights else "sdpa"]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    backend = BACKENDS[name]
    if return_weights and not backend.returns_weights:
        raise ValueError(f"backend {name!r} cannot return the weights; use 'math' or 'auto'")
    if dropout_p > 0 and not backend.supports_dropout:
        raise ValueError(f"backend {name!r} does not support dropout (dropout_p={dropout_p})")
    if score_mod is not None and not backend.supports_score_mod:
        raise ValueError(f"backend {name!r} does not take a score_mod; use 'tiled' or 'auto'")
    return backend
