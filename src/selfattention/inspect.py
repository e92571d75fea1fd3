"""Inspection: see inside every attention module of a model while it runs.

>>> from selfattention.modules import MultiHeadAttention
>>> model = torch.nn.Sequential(MultiHeadAttention(4, 4, 8, 0.0, num_heads=2))
>>> with capture(model) as cap:
...     _ = model(torch.randn(1, 3, 4))
>>> cap.names, cap["0"].weights.shape, cap["0"].head(1).weights.shape
(['0'], torch.Size([1, 2, 3, 3]), torch.Size([1, 3, 3]))

While a :func:`capture` is active, each attention module of the model runs an eager backend (``"math"``,
or the module's own backend if that returns weights) and records one :class:`Record` per forward pass;
when it ends the modules go back to their usual path (the fused kernel under ``backend="auto"``).
Recorded tensors are detached: recording does not change gradients or the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfattention.functional import attention_scores, expand_kv_heads
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


@dataclass(frozen=True)
class Record:
    """What one attention module computed in one forward pass, detached.

    Shapes have a leading batch axis when the module's input had one (``...`` below), then heads.

    Attributes:
        query: Q, ``(..., H, T, D)``, after any position hook.
        key: K, ``(..., G, S, D)``, including cached keys; ``G`` key/value heads (grouped-query attention).
        value: V, ``(..., G, S, E)``.
        scores: ω = Q Kᵀ, ``(..., H, T, S)``, before scaling and masking.
        weights: α = softmax(ω · scale + mask), ``(..., H, T, S)`` (after dropout in training mode).
        context: z = α V per head, ``(..., H, T, E)``, before the heads are merged by an output projection.
        scale: the number the scores were multiplied by.
        causal: whether the causal mask was applied.
        mask: the boolean mask passed besides the causal one (``True`` = may attend), or ``None``.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    scores: Tensor
    weights: Tensor
    context: Tensor
    scale: float
    causal: bool
    mask: Tensor | None

    @property
    def num_heads(self) -> int:
        """Query heads ``H``."""
        return self.query.shape[-3]

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads ``G``."""
        return self.key.shape[-3]

    def head(self, index: int) -> Head:
        """Query head ``index`` with the key/value head it reads (``index // (H // G)``).

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
            scores=self.scores[..., index, :, :],
            weights=self.weights[..., index, :, :],
            context=self.context[..., index, :, :],
        )


class Capture:
    """The records of a :func:`capture`, by module name (the qualified name in the model, ``""`` for the
    model itself), each a list with one :class:`Record` per forward pass."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._records: dict[str, list[Record]] = {name: [] for name in names}

    def __getitem__(self, name: str) -> Record:
        """The latest record of module ``name``.

        Raises:
            KeyError: naming the watched modules, when ``name`` is not one or has not run yet.
        """
        calls = self.calls(name)
        if not calls:
            raise KeyError(f"module {name!r} has not run since the capture began")
        return calls[-1]

    def calls(self, name: str) -> list[Record]:
        """Every record of module ``name``, in call order (one per forward pass, e.g. per decoding step)."""
        if name not in self._records:
            raise KeyError(f"no attention module named {name!r}; the model has {self.names}")
        return self._records[name]

    def items(self) -> Iterator[tuple[str, Record]]:
        """``(name, latest record)`` for each module that ran, in model order."""
        return ((name, calls[-1]) for name, calls in self._records.items() if calls)

    def clear(self) -> None:
        """Forget the records (the capture stays active)."""
        for calls in self._records.values():
            calls.clear()

    def _hook_for(self, name: str) -> Callable[..., None]:
        def record(
            query: Tensor,
            key: Tensor,
            value: Tensor,
            weights: Tensor,
            context: Tensor,
            *,
            scale: float,
            causal: bool,
            mask: Tensor | None,
        ) -> None:
            with torch.no_grad():
                expanded_key, _ = expand_kv_heads(query, key, value)
                scores = attention_scores(query, expanded_key)  # (..., H, T, S)
            self._records[name].append(
                Record(
                    query=query.detach(),
                    key=key.detach(),
                    value=value.detach(),
                    scores=scores.detach(),
                    weights=weights.detach(),
                    context=context.detach(),
                    scale=scale,
                    causal=causal,
                    mask=None if mask is None else mask.detach(),
                )
            )

        return record


@contextmanager
def capture(model: nn.Module) -> Iterator[Capture]:
    """Record Q, K, V, ω, α and z of every attention module in ``model`` for the forward passes inside.

    Args:
        model: any module; the attention modules of :mod:`selfattention.modules` in it are watched.

    Yields:
        A :class:`Capture`: ``cap[name]`` is the latest :class:`Record` of the module ``name``
        (``cap.names`` lists them), ``cap[name].head(h)`` one head.

    Raises:
        ValueError: when ``model`` contains no attention module.
    """
    watched = [(name, m) for name, m in model.named_modules() if isinstance(m, AttentionModule)]
    if not watched:
        raise ValueError(f"{type(model).__name__} contains no attention module from selfattention.modules")
    cap = Capture([name for name, _ in watched])
    previous = [m._recorder for _, m in watched]
    for name, m in watched:
        m._recorder = cap._hook_for(name)
    try:
        yield cap
    finally:
        for (_, m), before in zip(watched, previous, strict=True):
            m._recorder = before


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
    exactly that module's), then split into ``num_heads`` heads of width ``d_out // num_heads``.

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
    module = MultiHeadAttention(
        width, d_out, num_tokens, 0.0, num_heads, causal=causal, scale=None if scaled else 1.0
    ).eval()
    with torch.no_grad():
        for linear, matrix in zip((module.W_query, module.W_key, module.W_value), matrices, strict=True):
            linear.weight.copy_(matrix.T)  # a Linear layer stores the transpose
        with capture(module) as cap:
            module(inputs.float())
    return cap[""]
