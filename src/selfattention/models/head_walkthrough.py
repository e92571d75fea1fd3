"""The worked example's four steps, for one head of a pretrained encoder on a real sentence.

:func:`head_walkthrough` takes the hidden states entering a layer as the token vectors ``x (T, C)`` and the
head's own slice of the learned ``W^Q``, ``W^K``, ``W^V`` (with their biases), and computes ω, α and z with
the functions of :mod:`selfattention.functional`, just as the walk-through of the worked example does. The
result equals what the encoder's :class:`~selfattention.modules.MultiHeadAttention` computes for that head
(the tests compare it with :func:`selfattention.capture`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattention.functional import attention_scores, attention_weights, context_vectors
from selfattention.models.bert import BertLayer
from selfattention.pretrained import PretrainedEncoder
from selfattention.walkthrough import Walkthrough


@dataclass(frozen=True)
class HeadWalkthrough:
    """One head of one layer on one sentence.

    Attributes:
        walk: the four steps; ``walk.inputs`` is ``x (T, C)``, ``walk.projections`` the head's
            ``(W^Q, W^K, W^V)`` each ``(C, D)``, ``walk.queries`` = ``x W^Q + b^Q`` and so on.
        biases: ``(b^Q, b^K, b^V)``, each ``(D,)``.
        model: the model's name. layer: 1-based. head: 0-based. num_heads: heads in the layer.
    """

    walk: Walkthrough
    biases: tuple[Tensor, Tensor, Tensor]
    model: str
    layer: int
    head: int
    num_heads: int


def head_walkthrough(model: PretrainedEncoder, text: str, *, layer: int = 1, head: int = 0) -> HeadWalkthrough:
    """Walk through head ``head`` of layer ``layer`` on ``text`` with the model's learned weights.

    Args:
        model: a loaded pretrained encoder. text: one sentence.
        layer: 1 .. L; its input is the embedding output for layer 1, else the output of layer ``layer - 1``.
        head: 0 .. H - 1.

    Raises:
        ValueError: a layer or head out of range, or bad text (see :meth:`PretrainedEncoder.tokenize`).
    """
    config = model.config
    if not 1 <= layer <= config.num_hidden_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 1-{config.num_hidden_layers}")
    if not 0 <= head < config.num_attention_heads:
        raise ValueError(f"head {head} is out of range: each layer has heads 0-{config.num_attention_heads - 1}")
    encoded = model.encode([text])
    x = encoded.output.hidden_states[layer - 1][0]  # (T, C): what enters the layer
    block = model.encoder.layers[layer - 1]
    assert isinstance(block, BertLayer)
    attention = block.attention
    width = attention.head_dim
    rows = slice(head * width, (head + 1) * width)  # the head's D output features of each C x C projection
    projections = []
    biases = []
    with torch.no_grad():
        for linear in (attention.W_query, attention.W_key, attention.W_value):
            projections.append(linear.weight[rows].T.clone())  # Linear stores (out, in): (D, C) -> (C, D)
            biases.append(linear.bias[rows].clone())
        queries, keys, values = (x @ w + b for w, b in zip(projections, biases, strict=True))  # (T, D) each
        scale = 1.0 / math.sqrt(width)
        scores = attention_scores(queries, keys)  # ω (T, T)
        weights = attention_weights(scores, scale=scale)  # α (T, T)
        context = context_vectors(weights, values)  # z (T, D)
    walk = Walkthrough(
        tokens=encoded.batch.tokens(0),
        inputs=x,
        projections=(projections[0], projections[1], projections[2]),
        queries=queries,
        keys=keys,
        values=values,
        scale=scale,
        causal=False,
        scores=scores,
        weights=weights,
        context=context,
    )
    return HeadWalkthrough(
        walk=walk,
        biases=(biases[0], biases[1], biases[2]),
        model=model.name,
        layer=layer,
        head=head,
        num_heads=config.num_attention_heads,
    )
