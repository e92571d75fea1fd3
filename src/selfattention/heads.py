"""Head detectors: which heads look at the previous token, at an earlier copy of the token, or do induction.

Every score is read from the attention weights α that :func:`selfattention.capture` records while the model
runs once on a seeded sequence of random tokens repeated twice, ``x = r_0 .. r_{n-1} r_0 .. r_{n-1}``
(``T = 2n`` positions, ``B`` such sequences). For one head with weights ``α (B, T, T)``:

- **previous-token** score: the mean of ``α[i, i - 1]`` over positions ``i = 1 .. T - 1``;
- **duplicate-token** score: the mean of ``α[i, i - n]`` over the second copy ``i = n .. 2n - 1`` (the weight on
  the earlier occurrence of the same token);
- **induction** score: the mean of ``α[i, i - n + 1]`` over the second copy (the weight on the token that
  *followed* the earlier occurrence: the pattern "A B ... A -> B" of Olsson et al., 2022);
- **sink** share: the mean of ``α[i, 0]`` over ``i = 1 .. T - 1`` (the weight parked on the first token).

Each is a mean over the batch too, so all lie in ``[0, 1]``. For a causal language model the run also gives
the per-token loss (cross-entropy in nats) of predicting ``r_1 .. r_{n-1}`` in the first copy and the same
tokens in the second copy: random tokens cannot be predicted the first time, and a model that learns in
context (through its induction heads) predicts them well the second time.

>>> from selfattention import GPT, GPTConfig
>>> _ = torch.manual_seed(0)
>>> model = GPT(GPTConfig(vocab_size=50, context_length=32, emb_dim=16, num_layers=2, num_heads=2))
>>> scores = detect_heads(model, length=10)
>>> scores.induction.shape, scores.first_copy_loss is not None
(torch.Size([2, 2]), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfattention.inspect import capture
from selfattention.interventions import attention_modules, model_device, model_logits

PATTERNS = ("previous_token", "duplicate_token", "induction", "sink")
"""The score names, in the order :class:`HeadScores` holds them."""


@dataclass(frozen=True)
class HeadScores:
    """The detector scores of every head, each ``(L, H)`` (layer, head), and the copy losses.

    Attributes:
        previous_token, duplicate_token, induction, sink: the scores defined in the module docstring.
        first_copy_loss, second_copy_loss: mean cross-entropy (nats) per predicted token in each copy;
            ``None`` for a model without next-token logits (an encoder).
        length: ``n``, the tokens of one copy. seed: the seed of the random tokens.
    """

    previous_token: Tensor
    duplicate_token: Tensor
    induction: Tensor
    sink: Tensor
    first_copy_loss: float | None
    second_copy_loss: float | None
    length: int
    seed: int

    def pattern(self, name: str) -> Tensor:
        """The ``(L, H)`` scores of pattern ``name`` (one of :data:`PATTERNS`).

        Raises:
            ValueError: an unknown name.
        """
        if name not in PATTERNS:
            raise ValueError(f"unknown pattern {name!r}; choose one of {list(PATTERNS)}")
        return getattr(self, name)

    def top(self, name: str, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads of pattern ``name`` as ``(layer, head, score)``, best first."""
        scores = self.pattern(name)
        values, flat = scores.flatten().topk(min(k, scores.numel()))
        heads = scores.shape[1]
        return [(i // heads, i % heads, float(v)) for v, i in zip(values, flat.tolist(), strict=True)]


def repeated_tokens(vocab_size: int, length: int, *, batch: int = 4, seed: int = 0, low: int = 0) -> Tensor:
    """``(B, 2n)`` ids: ``batch`` rows of ``n = length`` random ids from ``low .. vocab_size - 1``, each twice.

    The ids come from ``torch.randint`` with a ``torch.Generator`` seeded by ``seed`` (the global seed is
    untouched).

    Raises:
        ValueError: ``length`` or ``batch`` below 1 (``length`` below 2 for the loss), or an empty id range.
    """
    if length < 2 or batch < 1:
        raise ValueError(f"length ({length}) must be at least 2 and batch ({batch}) at least 1")
    if not 0 <= low < vocab_size:
        raise ValueError(f"no ids to draw from {low} .. {vocab_size - 1}")
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(low, vocab_size, (batch, length), generator=generator)  # (B, n)
    return torch.cat([first, first], dim=1)  # (B, n) -> (B, 2n)


def pattern_scores(weights: Tensor, length: int) -> dict[str, Tensor]:
    """The four scores of every head from weights ``α (B, H, T, T)`` on a sequence repeated twice.

    Args:
        weights: one layer's α for ``B`` rows of ``T = 2 * length`` tokens.
        length: ``n``, the tokens of one copy.

    Returns:
        ``{pattern: (H,) scores}`` for each name in :data:`PATTERNS`.

    Raises:
        ValueError: weights that are not ``(B, H, 2n, 2n)``.
    """
    if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2] or weights.shape[-1] != 2 * length:
        raise ValueError(f"weights must be (B, H, {2 * length}, {2 * length}), got {tuple(weights.shape)}")
    second = torch.arange(length, 2 * length, device=weights.device)  # positions of the second copy
    later = torch.arange(1, 2 * length, device=weights.device)
    return {
        "previous_token": weights[..., later, later - 1].mean(dim=(0, 2)),  # (B, H, T-1) -> (H,)
        "duplicate_token": weights[..., second, second - length].mean(dim=(0, 2)),
        "induction": weights[..., second, second - length + 1].mean(dim=(0, 2)),
        "sink": weights[..., later, 0].mean(dim=(0, 2)),
    }


def copy_losses(logits: Tensor, ids: Tensor) -> tuple[float, float]:
    """Mean next-token loss (nats) on ``r_1 .. r_{n-1}`` in the first and in the second copy.

    Args:
        logits: ``(B, 2n, V)`` for ``ids (B, 2n)`` made by :func:`repeated_tokens`.
    """
    length = ids.shape[1] // 2
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # (B, 2n-1)
    # prediction at position i is of token i + 1: r_1..r_{n-1} are predicted at 0..n-2 and n..2n-2
    return float(losses[:, : length - 1].mean()), float(losses[:, length:].mean())


@torch.no_grad()
def detect_heads(model: nn.Module, *, length: int = 50, batch: int = 4, seed: int = 0, low: int = 0) -> HeadScores:
    """Score every head of ``model`` as previous-token, duplicate-token, induction and sink head.

    Args:
        model: a :class:`selfattention.GPT`, a :class:`selfattention.models.llama.Llama` or a
            :class:`selfattention.models.bert.BertEncoder` (any model whose attention modules are
            :class:`selfattention.modules.MultiHeadAttention` and whose config gives ``vocab_size``).
        length: ``n``, tokens per copy (the run has ``2n`` positions).
        batch: rows of random tokens. seed: their seed. low: the smallest id drawn (to skip special tokens).

    Returns:
        A :class:`HeadScores` on the CPU (the run is on the model's device); the losses are ``None`` for an
        encoder.

    Raises:
        ValueError: a run longer than the model's context, or bad ``length``/``batch``.
    """
    config: Any = model.config
    ids = repeated_tokens(int(config.vocab_size), length, batch=batch, seed=seed, low=low)  # the same on any device
    ids = ids.to(model_device(model))
    modules = attention_modules(model)
    was_training = model.training
    model.eval()
    try:
        with capture(model) as cap:
            logits = model_logits(model, ids)
    finally:
        model.train(was_training)
    per_layer = [pattern_scores(cap[name].weights, length) for name, _ in modules]
    stacked = {p: torch.stack([scores[p] for scores in per_layer]).cpu() for p in PATTERNS}  # (L, H) each
    first, second = copy_losses(logits, ids) if logits is not None else (None, None)
    return HeadScores(**stacked, first_copy_loss=first, second_copy_loss=second, length=length, seed=seed)
