"""Inspection: see inside every attention module of a model while it runs.

>>> from selfattention.modules import MultiHeadAttention
>>> model = torch.nn.Sequential(MultiHeadAttention(4, 4, 8, 0.0, num_heads=2))
>>> with capture(model) as cap:
...     _ = model(torch.randn(1, 3, 4))
>>> cap.names, cap["0"].weights.shape, cap["0"].head(1).weights.shape
(['0'], torch.Size([1, 2, 3, 3]), torch.Size([1, 3, 3]))

While a :func:`capture` is active, each attention module of the model runs its usual backend (the fused
kernel under ``backend="auto"``) and records one :class:`Record` per forward pass: Q, K, V and each row's
log-sum-exp, which the fused kernels compute anyway. The weights, scores and per-head context vectors are
recomputed exactly from them when asked for (all of them, some heads or rows, or the top-k keys of each
row), in bounded memory; see ``docs/capture.md``. In training mode with dropout the modules run the eager
``"math"`` path instead, whose weights after dropout are kept. Recorded tensors are detached: recording
does not change gradients or the outputs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from selfattention import checks
from selfattention.exact_weights import exact_context, exact_top_k, exact_weights
from selfattention.functional import attention_scores
from selfattention.masks import MaskDescription
from selfattention.modules import AttentionModule, MultiHeadAttention
from selfattention.walkthrough import random_projections


@dataclass(frozen=True)
class Head:
    """One head's view of a :class:`Record`: the same tensors without the head axis."""

    query: Tensor  # (..., T, D)
    key: Tensor  # (..., S, D)
    value: Tensor  # (..., S, E)
    scores: Tensor  # ω (..., T, S)
    weights: Tensor  # α (..., T, S)
    context: Tensor  # z (..., T, E)


FULL_LIMIT = 2 << 30
"""Bytes up to which :attr:`Record.weights` and :attr:`Record.scores` build the full ``(..., H, T, S)`` tensor."""

Selection = int | Sequence[int] | None
"""Heads or query rows: one index, a list of indices (heads) or a ``(start, stop)`` range (rows), or all."""


def _selection(
    count: int, num_queries: int, heads: Selection, rows: Selection, device: torch.device
) -> tuple[Tensor, tuple[int, int]]:
    """Head indices (on ``device``, where the tensors they select from are) and a row range, checked against
    ``count`` heads and ``num_queries`` rows."""
    chosen = list(range(count)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    if any(not 0 <= h < count for h in chosen):
        raise IndexError(f"heads {chosen} out of range: the module has {count} heads")
    span = (0, num_queries) if rows is None else (rows, rows + 1) if isinstance(rows, int) else tuple(rows)
    if len(span) != 2 or not 0 <= span[0] <= span[1] <= num_queries:
        raise IndexError(f"rows {rows} out of range: give a row or (start, stop) within 0 .. {num_queries}")
    return torch.tensor(chosen, dtype=torch.long, device=device), (int(span[0]), int(span[1]))


@dataclass(frozen=True, kw_only=True)
class Record:
    """What one attention module computed in one forward pass, detached.

    The module ran its usual backend (the fused kernel under ``backend="auto"``) and kept what is cheap:
    Q, K, V and each row's log-sum-exp ``lse``. Weights, scores and per-head contexts are recomputed
    exactly from them on request (:mod:`selfattention.exact_weights`), for the heads and rows asked for:
    :meth:`weights_for`, :meth:`scores_for`, :meth:`top_k`; :attr:`weights` and :attr:`scores` build the
    full tensors when they take at most :data:`FULL_LIMIT` bytes and raise a ValueError naming the size
    above it. In training mode with dropout the eager path ran and its weights (after dropout) are kept.

    Shapes have a leading batch axis when the module's input had one (``...`` below), then heads.

    Attributes:
        query: Q, ``(..., H, T, D)``, after any position hook.
        key: K, ``(..., G, S, D)``, including cached keys; ``G`` key/value heads (grouped-query attention).
        value: V, ``(..., G, S, E)``.
        scale: the number the scores were multiplied by.
        causal: whether the causal mask was applied.
        mask: the mask passed besides the causal one (boolean, ``True`` = may attend; float, added; or a
            :class:`~selfattention.masks.MaskDescription`), or ``None``.
        lse: the log-sum-exp of each row, ``(..., H, T)``, or ``None`` when the weights were kept.
        stored_weights: α as the eager path computed it (dropout in training), or ``None``.
        stored_context: z as the eager path computed it, or ``None`` (then :attr:`context` recomputes it).
    """

    query: Tensor
    key: Tensor
    value: Tensor
    scale: float
    causal: bool
    mask: Tensor | MaskDescription | None
    lse: Tensor | None = None
    stored_weights: Tensor | None = None
    stored_context: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.lse is None) == (self.stored_weights is None):
            raise ValueError("a Record needs exactly one of lse (to recompute the weights) and stored_weights")

    @property
    def num_heads(self) -> int:
        """Query heads ``H``."""
        return self.query.shape[-3]

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads ``G``."""
        return self.key.shape[-3]

    @property
    def full_bytes(self) -> int:
        """Bytes of the full ``(..., H, T, S)`` weights in float32."""
        return 4 * math.prod(self.query.shape[:-1]) * self.key.shape[-2]

    @property
    def weights(self) -> Tensor:
        """α = softmax(ω · scale + mask), ``(..., H, T, S)``, all heads (see :data:`FULL_LIMIT`)."""
        self._check_full("weights")
        return self.weights_for()

    @property
    def scores(self) -> Tensor:
        """ω = Q Kᵀ, ``(..., H, T, S)``, before scaling and masking, all heads (see :data:`FULL_LIMIT`)."""
        self._check_full("scores")
        return self.scores_for()

    def _check_full(self, name: str) -> None:
        if self.stored_weights is None and self.full_bytes > FULL_LIMIT:
            raise ValueError(
                f"the full {name} {tuple(self.query.shape[:-1])} x {self.key.shape[-2]} keys would take "
                f"{self.full_bytes / 2**30:.1f} GiB, over FULL_LIMIT ({FULL_LIMIT / 2**30:.0f} GiB): ask for "
                f"some heads or rows ({name}_for(heads=..., rows=...)) or the top keys (top_k(k))"
            )

    def _selection(self, heads: Selection, rows: Selection) -> tuple[Tensor, tuple[int, int]]:
        return _selection(self.num_heads, self.query.shape[-2], heads, rows, self.query.device)

    def weights_for(self, heads: Selection = None, rows: Selection = None) -> Tensor:
        """α of the chosen heads and rows, ``(..., h, r, S)``: exact, computed a chunk of rows at a time.

        Args:
            heads: a head index, a list of them, or ``None`` for all.
            rows: a query row, a ``(start, stop)`` range, or ``None`` for all.

        Raises:
            IndexError: heads or rows out of range.
        """
        chosen, span = self._selection(heads, rows)
        if self.stored_weights is not None:
            return self.stored_weights.index_select(-3, chosen)[..., span[0] : span[1], :]
        assert self.lse is not None
        weights = exact_weights(
            self.query, self.key, self.lse, scale=self.scale, causal=self.causal, mask=self.mask,
            heads=chosen, rows=span,
        )  # fmt: skip
        return weights.to(self.query.dtype)

    def scores_for(self, heads: Selection = None, rows: Selection = None) -> Tensor:
        """ω = q kᵀ of the chosen heads and rows, ``(..., h, r, S)``, before scaling and masking."""
        chosen, span = self._selection(heads, rows)
        query = self.query.index_select(-3, chosen)[..., span[0] : span[1], :]
        group = self.num_heads // self.num_kv_heads
        key = self.key.index_select(-3, torch.div(chosen, group, rounding_mode="floor"))
        return attention_scores(query, key)

    @property
    def context(self) -> Tensor:
        """z = α V per head, ``(..., H, T, E)``, before the heads are merged by an output projection."""
        return self.context_for()

    def context_for(self, heads: Selection = None, rows: Selection = None) -> Tensor:
        """z = α V of the chosen heads and rows, ``(..., h, r, E)``, recomputed a chunk of rows at a time."""
        chosen, span = self._selection(heads, rows)
        if self.stored_context is not None:
            return self.stored_context.index_select(-3, chosen)[..., span[0] : span[1], :]
        assert self.lse is not None
        context = exact_context(
            self.query, self.key, self.value, self.lse, scale=self.scale, causal=self.causal, mask=self.mask,
            heads=chosen, rows=span,
        )  # fmt: skip
        return context.to(self.value.dtype)

    def top_k(self, k: int, heads: Selection = None, rows: Selection = None) -> tuple[Tensor, Tensor, Tensor]:
        """The ``k`` largest weights of each row, exact, with their key indices and the rest of the mass.

        Returns:
            ``(weights (..., h, r, k), indices (..., h, r, k), rest (..., h, r))``; ``k`` is capped at ``S``.
            Memory: the result and one chunk of rows, never ``(T, S)`` per head.
        """
        chosen, span = self._selection(heads, rows)
        if self.stored_weights is not None:
            stored = self.weights_for(heads, rows)  # in the work dtype, as the recomputed path gives them
            weights = stored.to(checks.work_dtype(stored.dtype))
            top = torch.topk(weights, min(k, weights.shape[-1]), dim=-1)
            return top.values, top.indices, (1.0 - top.values.sum(-1)).clamp_min(0.0) * (weights.sum(-1) > 0)
        assert self.lse is not None
        return exact_top_k(
            self.query, self.key, self.lse, k, scale=self.scale, causal=self.causal, mask=self.mask,
            heads=chosen, rows=span,
        )  # fmt: skip

    def head(self, index: int) -> Head:
        """Query head ``index`` with the key/value head it reads (``index // (H // G)``); its weights and
        scores are computed here, ``(..., T, S)`` for this head.

        Raises:
            IndexError: for a head outside ``0 .. H - 1``.
        """
        if not 0 <= index < self.num_heads:
            raise IndexError(f"head {index} out of range: the module has {self.num_heads} heads")
        kv = index // (self.num_heads // self.num_kv_heads)
        return Head(
            query=self.query[..., index, :, :],
            key=self.key[..., kv, :, :],
            value=self.value[..., kv, :, :],
            scores=self.scores_for(index)[..., 0, :, :],
            weights=self.weights_for(index)[..., 0, :, :],
            context=self.context_for(index)[..., 0, :, :],
        )


@dataclass(frozen=True, kw_only=True)
class TopKeys:
    """The top keys of each row of one attention module in one forward pass, as :func:`capture_top_k` keeps them.

    Computed while the model ran, from the same Q, K and log-sum-exp a :class:`Record` holds (so the same
    numbers as ``record.top_k(k)``), which are then dropped: ``O(T·k)`` per head instead of Q, K and V.

    Attributes:
        weights: the ``k`` largest α of each row, exact, descending, ``(..., H, T, k)`` (``k`` capped at ``S``).
        indices: their key positions, ``(..., H, T, k)``.
        rest: the mass of the other keys, ``1 - Σ weights`` (0 for a row with no allowed key), ``(..., H, T)``.
        lse: each row's log-sum-exp, ``(..., H, T)``, or ``None`` when the eager path ran (dropout).
        scale: the number the scores were multiplied by.
    """

    weights: Tensor
    indices: Tensor
    rest: Tensor
    lse: Tensor | None
    scale: float

    @property
    def num_heads(self) -> int:
        """Query heads ``H``."""
        return self.weights.shape[-3]

    def top_k(self, k: int, heads: Selection = None, rows: Selection = None) -> tuple[Tensor, Tensor, Tensor]:
        """The ``k`` largest weights of each row, their key indices and the rest of the mass, as
        :meth:`Record.top_k` gives them, for ``k`` up to the number kept.

        Raises:
            ValueError: ``k`` below 1 or above the number of keys kept per row.
            IndexError: heads or rows out of range.
        """
        kept = self.weights.shape[-1]
        if not 1 <= k <= kept:
            raise ValueError(f"k must be within 1 .. {kept} (the keys kept per row by capture_top_k), got {k}")
        chosen, (start, stop) = _selection(self.num_heads, self.weights.shape[-2], heads, rows, self.weights.device)
        weights, indices = (t.index_select(-3, chosen)[..., start:stop, :] for t in (self.weights, self.indices))
        rest = self.rest.index_select(-2, chosen)[..., start:stop]
        return weights[..., :k], indices[..., :k], rest + weights[..., k:].sum(-1)


R = TypeVar("R", Record, TopKeys)


class Capture(Generic[R]):
    """The records of a :func:`capture` (each a :class:`Record`) or of a :func:`capture_top_k` (each a
    :class:`TopKeys`), by module name (the qualified name in the model, ``""`` for the model itself), each a
    list with one record per forward pass."""

    def __init__(self, names: list[str], make: Callable[..., R]) -> None:
        self.names = names
        self._make: Callable[..., R] = make
        self._records: dict[str, list[R]] = {name: [] for name in names}

    def __getitem__(self, name: str) -> R:
        """The latest record of module ``name``.

        Raises:
            KeyError: naming the watched modules, when ``name`` is not one or has not run yet.
        """
        calls = self.calls(name)
        if not calls:
            raise KeyError(f"module {name!r} has not run since the capture began")
        return calls[-1]

    def calls(self, name: str) -> list[R]:
        """Every record of module ``name``, in call order (one per forward pass, e.g. per decoding step)."""
        if name not in self._records:
            raise KeyError(f"no attention module named {name!r}; the model has {self.names}")
        return self._records[name]

    def items(self) -> Iterator[tuple[str, R]]:
        """``(name, latest record)`` for each module that ran, in model order."""
        return ((name, calls[-1]) for name, calls in self._records.items() if calls)

    def clear(self) -> None:
        """Forget the records (the capture stays active)."""
        for calls in self._records.values():
            calls.clear()

    def _hook_for(self, name: str) -> Callable[..., None]:
        def record(*args: Tensor, **kwargs: Any) -> None:
            self._records[name].append(self._make(*args, **kwargs))

        return record


def _record(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    context: Tensor,
    *,
    scale: float,
    causal: bool,
    mask: Tensor | MaskDescription | None,
    lse: Tensor | None,
    weights: Tensor | None,
) -> Record:
    """A :class:`Record` of what a module's recorder hook was handed, detached."""
    return Record(
        query=query.detach(),
        key=key.detach(),
        value=value.detach(),
        stored_context=None if lse is not None else context.detach(),  # else recomputed when read
        scale=scale,
        causal=causal,
        mask=mask.detach() if isinstance(mask, Tensor) else mask,
        lse=None if lse is None else lse.detach(),
        stored_weights=None if weights is None else weights.detach(),
    )


def _release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the system, where the C library is glibc (``malloc_trim``).

    Between two layers of a long input the freed scores and activations lie between the top keys kept so far,
    and glibc keeps such pages resident: at 8192 tokens on SmolLM2 trimming lowered the peak of
    :func:`capture_top_k` from 1.61 to 1.49 GiB. Elsewhere this does nothing.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _watch(model: nn.Module, make: Callable[..., R]) -> Iterator[Capture[R]]:
    """Hand every attention module of ``model`` a recorder that stores ``make(...)`` of what it computed."""
    watched = [(name, m) for name, m in model.named_modules() if isinstance(m, AttentionModule)]
    if not watched:
        raise ValueError(f"{type(model).__name__} contains no attention module from selfattention.modules")
    cap = Capture([name for name, _ in watched], make)
    previous = [m._recorder for _, m in watched]
    for (name, m), before in zip(watched, previous, strict=True):  # an enclosing capture still records
        m._recorder = cap._hook_for(name) if before is None else _both(cap._hook_for(name), before)
    try:
        yield cap
    finally:
        for (_, m), before in zip(watched, previous, strict=True):
            m._recorder = before


def _both(first: Callable[..., None], second: Callable[..., None]) -> Callable[..., None]:
    def record(*args: Any, **kwargs: Any) -> None:
        first(*args, **kwargs)
        second(*args, **kwargs)

    return record


@contextmanager
def capture(model: nn.Module) -> Iterator[Capture[Record]]:
    """Record Q, K, V, ω, α and z of every attention module in ``model`` for the forward passes inside.

    Args:
        model: any module; the attention modules of :mod:`selfattention.modules` in it are watched.

    Captures nest as PyTorch's hooks do: inside another capture of the same modules, both record every call.

    Yields:
        A :class:`Capture`: ``cap[name]`` is the latest :class:`Record` of the module ``name``
        (``cap.names`` lists them), ``cap[name].head(h)`` one head.

    Raises:
        ValueError: when ``model`` contains no attention module.
    """
    yield from _watch(model, _record)


@contextmanager
def capture_top_k(model: nn.Module, k: int) -> Iterator[Capture[TopKeys]]:
    """Keep the ``k`` largest weights of every row and head of every attention module, and nothing else.

    The same numbers as ``record.top_k(k)`` of a :func:`capture`, but each module's top keys are taken while
    the model runs, from the Q, K and log-sum-exp of that call, which are then dropped: the memory held is
    ``O(T·k)`` per head (at 8192 tokens and ``k = 16``, 14 MiB per SmolLM2 layer, where a :class:`Record`
    holds about 30 MiB), and the pages freed between layers are handed back to the system. For long inputs
    when only the strongest links are wanted (the compact viewer page, head summaries).

    Args:
        model: any module; the attention modules of :mod:`selfattention.modules` in it are watched.
        k: keys kept per row (capped at the number of keys).

    Yields:
        A :class:`Capture` whose records are :class:`TopKeys`.

    Raises:
        ValueError: when ``model`` contains no attention module, or ``k`` is below 1.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")

    def make(*args: Tensor, **kwargs: Any) -> TopKeys:
        record = _record(*args, **kwargs)
        weights, indices, rest = record.top_k(k)
        lse, scale = record.lse, record.scale  # detached, as the record holds them
        del record  # Q, K, V go now: only the top keys stay
        _release_freed_memory()
        return TopKeys(weights=weights, indices=indices, rest=rest, lse=lse, scale=scale)

    yield from _watch(model, make)


def capture_projections(
    inputs: Tensor,
    d_out: int,
    *,
    seed: int = 123,
    num_heads: int = 1,
    causal: bool = False,
    scaled: bool = True,
) -> Record:
    """Self-attention over ``inputs (T, C)`` with random projections of width ``d_out``, recorded per head.

    ``W^Q``, ``W^K``, ``W^V`` are drawn as ``torch.rand(C, d_out)`` in that order after
    ``torch.manual_seed(seed)`` (the chapter-3 ``SelfAttentionV1`` draw, so with one head the numbers are
    that module's, to float32's precision), then split into ``num_heads`` heads of width ``d_out // num_heads``.
    The module runs in float64: this is the walk-through of a few tokens, whose rows of α must sum to 1 to the
    printed digits even for embeddings in the thousands (in float32, scores near 10**6 carry rounding errors
    of 0.06, and α rebuilt from them no longer sums to 1).

    Args:
        inputs: token embeddings, ``(T, C)``.
        d_out: width of the queries, keys and values (all heads together).
        seed: the seed for the draw. num_heads: heads to split ``d_out`` into.
        causal: each token attends only to itself and earlier tokens.
        scaled: multiply the scores by ``1/sqrt(d_out // num_heads)``; otherwise leave them unscaled.

    Returns:
        The :class:`Record` (no batch axis): ``query (H, T, D)``, ..., ``weights (H, T, T)``,
        ``context (H, T, D)``.

    Raises:
        ValueError: ``d_out`` below 1 or not divisible by ``num_heads``, or a bad ``inputs`` shape.
    """
    if inputs.dim() != 2:
        raise ValueError(f"inputs must be (tokens, width), got shape {tuple(inputs.shape)}")
    num_tokens, width = inputs.shape
    matrices = random_projections(width, d_out, seed)  # W^Q, W^K, W^V, each (C, d_out)
    module = (
        MultiHeadAttention(width, d_out, num_tokens, 0.0, num_heads, causal=causal, scale=None if scaled else 1.0)
        .eval()
        .double()
    )
    with torch.no_grad():
        for linear, matrix in zip((module.W_query, module.W_key, module.W_value), matrices, strict=True):
            linear.weight.copy_(matrix.T)  # a Linear layer stores the transpose
        with capture(module) as cap:
            module(inputs.double())
    return cap[""]
