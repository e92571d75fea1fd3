"""The attention backends, in one registry with one signature.

Every backend is a function::

    fn(query, key, value, *, mask, causal, scale, dropout_p, return_weights) -> (context, weights | None)

with query ``(..., H, T, D)``, key ``(..., H, S, D)`` and value ``(..., H, S, E)`` already checked and with
grouped key/value heads already expanded (see :func:`selfattention.functional.attention`). ``mask`` is
boolean (``True`` = may attend) or float (added), ``causal`` means the bottom-right causal mask, and
``scale`` is a number. A backend with ``takes_mask_descriptions`` also gets a
:class:`~selfattention.masks.MaskDescription` as it is (the others get it materialised), and one with
``supports_score_mod`` takes a ``score_mod`` keyword. Each backend is tested against ``"math"``, which is
the reference. ``with_lse`` is the same backend returning ``(context, lse (..., T))``, each row's log-sum-exp,
instead of the weights (:mod:`selfattention.backends.logsumexp`; :func:`selfattention.capture` records it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattention.backends import blocksparse, logsumexp, loop, math, sdpa, tiled
from selfattention.masks import MaskDescription

BackendFn = Callable[..., tuple[Tensor, Tensor | None]]


@dataclass(frozen=True, kw_only=True)
class Backend:
    """A named attention implementation and what it can do."""

    name: str
    fn: BackendFn
    returns_weights: bool
    supports_dropout: bool
    doc: str
    with_lse: Callable[..., tuple[Tensor, Tensor]]
    """``(query, key, value, *, mask, causal, scale[, score_mod]) -> (context, lse)``, without dropout."""
    takes_mask_descriptions: bool = False
    """True: gets :class:`~selfattention.masks.MaskDescription` masks as they are (else materialised)."""
    supports_score_mod: bool = False
    takes_grouped_heads: bool = False
    """True: gets grouped key/value heads ``(..., G, S, D)`` with ``G < H`` uncopied (on the CPU)."""
    differentiates_masks: bool = True
    """False: a float mask that requires grad (a learned bias) would get no gradient, so it is refused."""


BACKENDS: dict[str, Backend] = {
    "loop": Backend(
        name="loop",
        fn=loop.attention,
        with_lse=logsumexp.with_row_logsumexp(loop.attention),
        returns_weights=True,
        supports_dropout=False,
        doc="per-query Python loops, for reading",
    ),
    "math": Backend(
        name="math",
        fn=math.attention,
        with_lse=logsumexp.with_row_logsumexp(math.attention),
        returns_weights=True,
        supports_dropout=True,
        doc="matrix form, the reference",
    ),
    "sdpa": Backend(
        name="sdpa",
        fn=sdpa.attention,
        with_lse=logsumexp.sdpa_with_lse,
        returns_weights=False,
        supports_dropout=True,
        doc="PyTorch's fused scaled_dot_product_attention",
        takes_grouped_heads=True,
    ),
    "tiled": Backend(
        name="tiled",
        fn=tiled.attention,
        with_lse=tiled.attention_with_lse,
        returns_weights=False,
        supports_dropout=False,
        doc="flash-style online softmax over tiles in plain PyTorch, O(T + S) memory",
        takes_mask_descriptions=True,
        supports_score_mod=True,
        differentiates_masks=False,
    ),
    "blocksparse": Backend(
        name="blocksparse",
        fn=blocksparse.attention,
        with_lse=logsumexp.blocksparse_with_lse,
        returns_weights=False,
        supports_dropout=False,
        doc="the fused kernel on the non-empty tiles only, O(T + S) memory",
        takes_mask_descriptions=True,
        differentiates_masks=False,
    ),
}


@dataclass(frozen=True)
class Call:
    """What an attention call needs, as ``"auto"`` sees it."""

    return_weights: bool
    dropout_p: float
    described_mask: bool
    tensor_mask: bool
    causal: bool
    score_mod: bool
    shape: tuple[int, int]


SMALL = 512 * 512
"""``T * S`` up to which a mask description is materialised for the fused kernel, whose one call over a
dense mask beats the block-sparse calls there (2 cores, sliding windows and documents, 1 and 4 heads: at
384 tokens 1.3 to 2.6x faster forward, 1.1 to 1.8x forward+backward; at 512 on par; at 768 slower)."""

AUTO: list[tuple[str, Callable[[Call], bool], str]] = [
    ("the weights are returned", lambda c: c.return_weights, "math"),
    ("dropout", lambda c: c.dropout_p > 0, "math"),
    ("a score_mod", lambda c: c.score_mod, "tiled"),
    ("a mask description, T·S > 512²", lambda c: c.described_mask and c.shape[0] * c.shape[1] > SMALL, "blocksparse"),
    ("causal, T ≠ S, no tensor mask", lambda c: c.causal and not c.tensor_mask and c.shape[0] != c.shape[1],
     "blocksparse"),
    ("anything else (no mask, causal with T = S, a tensor mask, a small description)", lambda c: True, "sdpa"),
]  # fmt: skip
"""The ``"auto"`` rules, first match wins (``docs/fast-attention.md``'s table is this list). This is the only
place that chooses a backend: the modules pass their ``backend`` through unchanged."""


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is ``"auto"`` or a key of :data:`BACKENDS`.

    >>> check_name("sdpa")
    """
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")


def choose_backend(
    name: str,
    *,
    return_weights: bool,
    dropout_p: float,
    mask: object,
    causal: bool,
    score_mod: object = None,
    shape: tuple[int, int] = (0, 0),
) -> Backend:
    """Look up ``name`` in :data:`BACKENDS`, or pick one for ``"auto"`` by the first rule of :data:`AUTO`.

    Why these rules (measured by ``benchmarks/attention.py``): the fused kernel (``"sdpa"``) is the
    fastest dense attention and already skips most masked work for ``is_causal`` with ``T == S``, but it
    computes every score a tensor mask covers; ``"blocksparse"`` runs the same kernel only on the tiles a
    mask description leaves non-empty, and never builds a ``(T, S)`` mask. Only ``"math"`` returns the
    weights, only ``"tiled"`` takes a ``score_mod``, and only the eager and fused kernels do dropout.
    Dropout goes to ``"math"``: it then acts on the explicit weights α exactly as the reference defines it
    (and as :func:`selfattention.capture` records it); ``backend="sdpa"`` keeps the fused kernel's own
    dropout for speed.

    Raises:
        ValueError: for an unknown name, or a backend that cannot do what the call asks.
    """
    if name == "auto":
        call = Call(
            return_weights=return_weights,
            dropout_p=dropout_p,
            described_mask=isinstance(mask, MaskDescription),
            tensor_mask=isinstance(mask, Tensor),
            causal=causal,
            score_mod=score_mod is not None,
            shape=shape,
        )
        name = next(backend for _, applies, backend in AUTO if applies(call))
    check_name(name)
    backend = BACKENDS[name]
    if return_weights and not backend.returns_weights:
        raise ValueError(f"backend {name!r} cannot return the weights; use 'math' or 'auto'")
    if dropout_p > 0 and not backend.supports_dropout:
        raise ValueError(f"backend {name!r} does not support dropout (dropout_p={dropout_p})")
    if score_mod is not None and not backend.supports_score_mod:
        raise ValueError(f"backend {name!r} does not take a score_mod (only 'tiled' does, without weights or dropout)")
    if isinstance(mask, Tensor) and mask.requires_grad and torch.is_grad_enabled() and not backend.differentiates_masks:
        raise ValueError(
            f"backend {name!r} gives no gradient to a float mask that requires grad (a learned bias); use 'math', "
            "'sdpa' or 'auto' without a score_mod, or pass mask.detach()"
        )
    return backend
