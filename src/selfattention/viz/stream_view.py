"""The last step of a streamed run in the viewer: the kept tokens, the sinks, and where the evicted ones were.

:func:`streaming_view` feeds a token stream through caches of a :class:`selfattention.kv_cache.CachePolicy`
one token at a time and records the last step with :func:`selfattention.capture`. The page's tokens are what
the cache holds at that step, in cache order: the sink tokens (marked ``⚓``), then one marker token
``⋯ N evicted ⋯`` standing for every token dropped so far, then the window. Only the last token's row is a
real query: it is the streamed step, its keys rotated by their place in the cache as attention saw them, so
the page's ω = q · k, α and z are exactly what the model computed. The other rows are empty (their queries ran
at earlier steps, against keys at other places), and the marker gets no weight: the last step cannot see
what was evicted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from selfattention.inspect import capture
from selfattention.kv_cache import CachePolicy, RollingKVCache
from selfattention.streaming import feed, make_caches
from selfattention.viz.html import AttentionView, HeadData

if TYPE_CHECKING:
    from selfattention.generate import CausalLM
    from selfattention.inspect import Record

SINK = "⚓"


def streaming_view(
    model: CausalLM, ids: Tensor, pieces: list[str], policy: CachePolicy, *, title: str = "Streaming"
) -> AttentionView:
    """Every attention layer's last step over the stream ``ids (N,)``, shown with the tokens ``pieces``.

    Args:
        model: the language model (see :func:`selfattention.streaming.make_caches` for which ones).
        ids: the token ids of the whole stream. pieces: one readable string per id.
        policy: the cache policy of the stream.
        title: shown at the top of the page.

    Raises:
        ValueError: ``pieces`` and ``ids`` of different lengths, an empty stream, or see
            :func:`selfattention.streaming.make_caches`.
    """
    if len(pieces) != len(ids) or len(ids) == 0:
        raise ValueError(f"give one piece per token id and at least one: {len(pieces)} pieces, {len(ids)} ids")
    caches = make_caches(model, 1, policy, max_len=len(ids) if policy.kind == "full" else None)
    with torch.no_grad():
        for t in range(len(ids) - 1):
            feed(model, ids[t : t + 1].view(1, 1), caches)
        with capture(cast(nn.Module, model)) as cap:
            feed(model, ids[-1:].view(1, 1), caches)
    cache = caches[0]
    kept = cache.kept() if isinstance(cache, RollingKVCache) else list(range(len(ids)))
    sinks = sum(1 for index in kept if index < policy.num_sinks)
    evicted = len(ids) - len(kept)
    tokens = [SINK + pieces[i] for i in kept[:sinks]]
    tokens += [f"⋯ {evicted} evicted ⋯"] if evicted else []
    tokens += [pieces[i] for i in kept[sinks:]]
    columns = [*range(sinks), *range(sinks + (1 if evicted else 0), len(tokens))]  # view column of each key
    layers, names, scales = [], [], []
    for name in cap.names:
        record = cap[name]
        layers.append([_last_row_head(record, h, columns, len(tokens)) for h in range(record.num_heads)])
        names.append(name)
        scales.append(float(record.scale))
    kind = f"{policy.kind}, {len(kept)} tokens kept of {len(ids)}"
    return AttentionView(
        tokens, layers, causal=True, layer_names=names, scales=scales, title=f"{title} (last step; {kind})"
    )


def _last_row_head(record: Record, index: int, columns: list[int], size: int) -> HeadData:
    """Head ``index`` of a one-token step, placed in the last row; keys and values at their ``columns``."""
    head = record.head(index)  # batch of 1, one query: (1, 1, D) query, (1, S, D) keys ...
    width, value_width = head.query.shape[-1], head.value.shape[-1]
    query, context = torch.zeros(size, width), torch.zeros(size, value_width)
    key, value = torch.zeros(size, width), torch.zeros(size, value_width)
    scores, weights = torch.zeros(size, size), torch.zeros(size, size)
    at = torch.tensor(columns)
    # the page is built on the CPU, wherever the model ran
    query[-1], context[-1] = head.query[0, -1].cpu(), head.context[0, -1].cpu()
    key[at], value[at] = head.key[0].cpu(), head.value[0].cpu()
    scores[-1, at], weights[-1, at] = head.scores[0, -1].cpu(), head.weights[0, -1].cpu()
    return HeadData.from_tensors(query, key, value, scores, weights, context)
