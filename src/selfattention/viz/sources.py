"""Views to look at without a trained model: the worked example, and any text embedded the same way.

:func:`example_view` gives two layers:

* ``"W = I"``: the worked example's attention as the book first computes it: one head, the embeddings
  themselves as queries, keys and values (q = k = v = x), unscaled softmax. For "journey" the weights are
  0.1385 ... 0.1581 and the context vector is [0.4419, 0.6515, 0.5683].
* ``"random W"``: ``num_heads`` heads of width 2 from random projections ``W^Q, W^K, W^V`` drawn as
  ``torch.rand(3, 2 * num_heads)`` in that order after ``torch.manual_seed(seed)``, scores scaled by
  ``1/sqrt(2)``, so that the head picker and the thumbnails have different heads to show.

Words of other text are embedded as the example does it where the word is one of the example's tokens
(case-insensitive), and otherwise by 3 numbers in [0, 1) drawn from a generator seeded with the word's
CRC-32, so the same word always gets the same vector. These are stand-ins for learned embeddings.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from selfattention import examples
from selfattention.functional import attention_scores, attention_weights, causal_mask, context_vectors
from selfattention.viz.html import AttentionView, HeadData

HEAD_WIDTH = 2


def embed_words(words: list[str]) -> Tensor:
    """``(T, 3)`` embeddings for ``words``: the example's vector for its tokens, a seeded draw for others."""
    known = {token.lower(): row for token, row in zip(examples.TOKENS, examples.EMBEDDINGS, strict=True)}
    rows = []
    for word in words:
        if word.lower() in known:
            rows.append(torch.tensor(known[word.lower()]))
        else:
            generator = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
            rows.append(torch.rand(3, generator=generator))
    return torch.stack(rows)  # (T, 3)


def _head(query: Tensor, key: Tensor, value: Tensor, *, scale: float, causal: bool) -> HeadData:
    """One head of self-attention on ``(T, D)`` inputs, from the math core."""
    scores = attention_scores(query, key)  # (T, D) @ (D, T) -> (T, T)
    mask = causal_mask(len(query), len(key)) if causal else None
    weights = attention_weights(scores, mask=mask, scale=scale)
    return HeadData.from_tensors(query, key, value, scores, weights, context_vectors(weights, value))


def example_view(
    text: str | None = None, *, num_heads: int = 4, causal: bool = False, seed: int = 123
) -> AttentionView:
    """The worked example (or ``text``, split on whitespace) as a two-layer :class:`AttentionView`.

    Args:
        text: words to look at; ``None`` for "Your journey starts with one step".
        num_heads: heads of the random-projection layer.
        causal: mask future tokens in both layers.
        seed: seed of the random projections.

    Raises:
        ValueError: for empty text or ``num_heads`` below 1.
    """
    words = list(examples.TOKENS) if text is None else text.split()
    if not words:
        raise ValueError("the text to view is empty; give at least one word")
    if num_heads < 1:
        raise ValueError(f"num_heads must be at least 1, got {num_heads}")
    x = embed_words(words).float()  # (T, 3)
    identity = _head(x, x, x, scale=1.0, causal=causal)
    torch.manual_seed(seed)
    w_query, w_key, w_value = (torch.rand(x.shape[1], HEAD_WIDTH * num_heads) for _ in range(3))
    # (T, 3) @ (3, H*D) -> (T, H*D) -> (H, T, D)
    queries, keys, values = (
        (x @ w).view(len(words), num_heads, HEAD_WIDTH).transpose(0, 1) for w in (w_query, w_key, w_value)
    )
    scale = 1 / math.sqrt(HEAD_WIDTH)
    heads = [_head(queries[h], keys[h], values[h], scale=scale, causal=causal) for h in range(num_heads)]
    return AttentionView(
        tokens=words,
        layers=[[identity], heads],
        causal=causal,
        layer_names=[
            "W = I (q = k = v = x, unscaled)",
            f"random W, {num_heads} heads (scaled 1/√{HEAD_WIDTH})",
        ],
        scales=[1.0, scale],
        title="Your journey starts with one step" if text is None else "Worked-example embeddings",
    )
