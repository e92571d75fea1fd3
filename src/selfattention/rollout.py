"""Attention rollout and attention flow: how much each output token draws on each input token, through all layers.

One layer's attention α says where a token reads from the layer below, but the residual connection also
carries the token's own vector up unchanged, and the layers compose. Abnar and Zuidema (2020, "Quantifying
Attention Flow in Transformers", ACL) account for both:

- :func:`residual_attention` models the residual connection as an identity next to attention:
  ``Â = 0.5 · mean_h(α_h) + 0.5 · I``, rows renormalised to sum to 1 (heads averaged).
- :func:`attention_rollout` multiplies those matrices from the first layer up: ``R_l = Â_l R_{l-1}``,
  ``R_0 = I``. ``R_l[i, j]`` is the share of input token ``j`` in token ``i`` after layer ``l``.
- :func:`attention_flow` treats the layers as a graph instead, each ``Â_l[i, j]`` the capacity of an edge
  from token ``i`` of layer ``l`` to token ``j`` of the layer below, and takes the maximum flow from an output
  token to each input token (computed by networkx, not by hand). Flow is much slower than rollout, so it is
  limited to :data:`MAX_FLOW_TOKENS` tokens.

Shapes: ``L`` layers, ``H`` heads, ``T`` tokens (queries and keys are the same tokens here). Causal models need
nothing special: a masked key has weight 0 in α and so in ``Â`` (each row stays over the allowed keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfattention import checks

MAX_FLOW_TOKENS = 24
"""The most tokens :func:`attention_flow` accepts: one maximum-flow problem per (output, input) pair on a graph
of ``(L + 1) · T`` nodes and up to ``L · T²`` edges grows quickly (about ``T² · L · T²`` work)."""


def residual_attention(weights: Tensor) -> Tensor:
    """One layer's attention with the residual connection: ``0.5 · mean_h(α_h) + 0.5 · I``, rows summing to 1.

    Args:
        weights: α of one layer, ``(..., H, T, T)`` (rows: queries, columns: keys).

    Returns:
        ``(..., T, T)``, in float64 for float64 weights and float32 otherwise (bfloat16 weights are averaged
        in float32).

    Raises:
        ValueError: fewer than 3 dimensions, or queries and keys of different lengths (a cached decoding step).

    >>> residual_attention(torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]))
    tensor([[0.5000, 0.5000],
            [0.0000, 1.0000]])
    """
    if weights.dim() < 3 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights must be (..., heads, tokens, tokens), got shape {tuple(weights.shape)}")
    mean = weights.to(checks.work_dtype(weights.dtype)).mean(dim=-3)  # (..., H, T, T) -> (..., T, T)
    eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
    mixed = 0.5 * mean + 0.5 * eye
    return mixed / mixed.sum(dim=-1, keepdim=True)


def attention_rollout(layers: Sequence[Tensor]) -> Tensor:
    """The rollout after each layer: ``R_l = Â_l R_{l-1}`` with ``R_0 = I`` (Abnar and Zuidema, 2020).

    Args:
        layers: α of each layer from the first, each ``(..., H, T, T)``.

    Returns:
        ``(L, ..., T, T)``; ``[l, ..., i, j]`` is the share of input token ``j`` in token ``i`` after layer ``l``
        (0-based); ``[-1]`` is the whole model's. Every row sums to 1.

    Raises:
        ValueError: no layers, or layers of different shapes.
    """
    if not layers:
        raise ValueError("attention_rollout needs at least one layer")
    shapes = {tuple(w.shape) for w in layers}
    if len(shapes) > 1:
        raise ValueError(f"every layer's weights must have one shape, got {sorted(shapes)}")
    result = []
    rolled: Tensor | None = None
    for weights in layers:
        step = residual_attention(weights)  # (..., T, T)
        rolled = step if rolled is None else step @ rolled
        result.append(rolled)
    return torch.stack(result)


def attention_flow(layers: Sequence[Tensor], queries: Sequence[int] | None = None) -> Tensor:
    """The maximum flow from each output token to each input token through the layers' ``Â`` (Abnar and Zuidema).

    Nodes are ``(l, t)`` for layers ``l = 0 .. L`` (0: the inputs) and tokens ``t``; an edge from ``(l, i)`` to
    ``(l - 1, j)`` has capacity ``Â_l[i, j]`` (:func:`residual_attention`). The flow from ``(L, i)`` to
    ``(0, j)`` is computed with :func:`networkx.maximum_flow_value`. Unlike rollout's rows, a row of flows
    need not sum to 1 (each value is a separate maximum); divide by the row's sum to compare shares.

    Args:
        layers: α of each layer from the first, each ``(H, T, T)`` (one text, no batch axis).
        queries: the output tokens to compute (default: all ``T``).

    Returns:
        ``(len(queries), T)``: row ``q`` holds the flows from output token ``queries[q]`` to every input token,
        float64 for float64 weights, else float32 (as :func:`attention_rollout`).

    Raises:
        ValueError: no layers, a batch axis, more than :data:`MAX_FLOW_TOKENS` tokens, or a query out of range.
        ImportError: networkx is not installed (naming the package).
    """
    if not layers:
        raise ValueError("attention_flow needs at least one layer")
    if any(w.dim() != 3 for w in layers):
        raise ValueError(f"attention_flow takes one text's (heads, T, T) weights, got {tuple(layers[0].shape)}")
    if len({w.shape[-2:] for w in layers}) > 1 or layers[0].shape[-1] != layers[0].shape[-2]:
        raise ValueError(
            f"every layer's weights must be (heads, T, T) for one T, got {[tuple(w.shape) for w in layers]}"
        )
    tokens = layers[0].shape[-1]
    if tokens > MAX_FLOW_TOKENS:
        raise ValueError(
            f"attention flow is limited to {MAX_FLOW_TOKENS} tokens (one maximum-flow problem per pair of "
            f"tokens); the text has {tokens}: shorten it or use rollout"
        )
    chosen = list(range(tokens)) if queries is None else list(queries)
    bad = [q for q in chosen if not 0 <= q < tokens]
    if bad:
        raise ValueError(f"queries {bad} out of range: the text has tokens 0-{tokens - 1}")
    try:
        import networkx as nx
    except ImportError as error:  # pragma: no cover - networkx comes with torch
        raise ImportError("attention flow needs networkx: pip install 'networkx>=3.0'") from error
    graph = nx.DiGraph()
    for depth, weights in enumerate(layers, start=1):
        step = residual_attention(weights).tolist()  # (T, T)
        for i, row in enumerate(step):
            for j, capacity in enumerate(row):
                if capacity > 0.0:  # a masked key (causal) gets no edge
                    graph.add_edge((depth, i), (depth - 1, j), capacity=capacity)
    top = len(layers)
    flows = torch.zeros(len(chosen), tokens, dtype=checks.work_dtype(layers[0].dtype))
    for row, query in enumerate(chosen):
        for key in range(tokens):
            if graph.has_node((0, key)) and graph.has_node((top, query)):
                flows[row, key] = nx.maximum_flow_value(graph, (top, query), (0, key))
    return flows
