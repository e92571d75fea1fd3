"""Running a language model over a stream longer than its context: caches by policy, and per-token losses.

:func:`make_caches` builds one cache per layer for a :class:`selfattention.kv_cache.CachePolicy`;
:func:`stream_losses` feeds a token stream through them one token at a time and returns the loss of each
prediction, and :func:`window_losses` computes the baseline that a rolling cache approximates: the model run
afresh over the last ``window`` tokens for each prediction. ``benchmarks/streaming.py`` compares them.

The models: anything :func:`selfattention.generate.generate` takes (``config.context_length``,
``make_kv_caches``, ``model(idx, kv_caches=)``). A rotary model exposes its RoPE tables as ``model.rotary``
(a module with ``cos`` and ``sin`` buffers, ``(context_length, D)``, "rotate half" layout), as
:class:`selfattention.GPT` with ``rope=True`` does; a model without ``rotary`` has learned absolute positions
and gets only the full cache (see :mod:`selfattention.kv_cache` for why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from selfattention.kv_cache import CachePolicy, KVCache, RollingKVCache

if TYPE_CHECKING:
    from selfattention.generate import CausalLM


def make_caches(model: CausalLM, batch_size: int, policy: CachePolicy, max_len: int | None = None) -> list[KVCache]:
    """One cache per layer of ``model`` for ``policy``.

    Args:
        model: the language model. batch_size: rows decoded together.
        policy: ``full`` gives ``model.make_kv_caches(batch_size, max_len)``; ``window`` and ``sinks`` give
            :class:`RollingKVCache` objects of ``sinks + window`` positions, with the model's RoPE tables.
        max_len: positions of a full cache (default: the context).

    Raises:
        ValueError: ``window`` or ``sinks`` for a model with learned absolute positions, or sinks plus
            window beyond the context.
    """
    context = int(model.config.context_length)
    if policy.kind == "full":
        return model.make_kv_caches(batch_size, max_len or context)
    window = policy.window_for(context)
    rotary = getattr(model, "rotary", None)
    if rotary is None:
        raise ValueError(
            f"the {policy.kind!r} cache needs a rotary model: this one has learned absolute positions, which "
            "a cached token cannot change (use the full cache, or a model with rope=True)"
        )
    caches: list[KVCache] = []
    for layer in model.make_kv_caches(batch_size, 1):  # one position per layer: its heads, width, dtype, device
        _, heads, _, width = layer.keys.shape
        caches.append(
            RollingKVCache(
                batch_size,
                heads,
                width,
                window=window,
                sinks=policy.num_sinks,
                rotary=(rotary.cos, rotary.sin),
                dtype=layer.keys.dtype,
                device=layer.keys.device,
            )
        )
    return caches


def feed(model: CausalLM, tokens: Tensor, caches: list[KVCache]) -> Tensor:
    """Run ``tokens (B, T)`` after the cached ones; returns the logits ``(B, T, V)``.

    Rolling caches first make room for the ``T`` tokens, so that the model, which reads ``caches[0].length``,
    places them at their index inside the cache.
    """
    for cache in caches:
        if isinstance(cache, RollingKVCache):
            cache.make_room(tokens.shape[1])
    logits: Tensor = model(tokens, kv_caches=caches)[0]
    return logits


@torch.no_grad()
def stream_losses(model: CausalLM, ids: Tensor, policy: CachePolicy) -> tuple[Tensor, list[KVCache]]:
    """Feed ``ids (T,)`` one token at a time through caches of ``policy``; the loss of every prediction.

    Returns:
        ``(losses (T - 1,), caches)``: ``losses[t]`` is the cross-entropy (nats) of predicting ``ids[t + 1]``
        from what the cache holds after ``ids[t]``; the caches as the last step left them.

    Raises:
        ValueError: see :func:`make_caches`; a full cache also fails past the context.
    """
    caches = make_caches(model, 1, policy, max_len=len(ids) if policy.kind == "full" else None)
    losses = torch.empty(len(ids) - 1)
    for t in range(len(ids) - 1):
        logits = feed(model, ids[t : t + 1].view(1, 1), caches)[0, -1]  # (V,)
        losses[t] = F.cross_entropy(logits.float(), ids[t + 1])
    return losses, caches


@torch.no_grad()
def window_losses(model: CausalLM, ids: Tensor, window: int, steps: list[int]) -> Tensor:
    """The loss of predicting ``ids[t + 1]`` for each ``t`` in ``steps``, running the model afresh over
    ``ids[t - window + 1 : t + 1]`` (the last ``window`` tokens, at positions ``0 .. window - 1``).

    Returns:
        ``(len(steps),)`` cross-entropies in nats.
    """
    losses = torch.empty(len(steps))
    for i, t in enumerate(steps):
        logits = model(ids[max(0, t - window + 1) : t + 1].view(1, -1))[0][0, -1]  # (V,)
        losses[i] = F.cross_entropy(logits.float(), ids[t + 1])
    return losses
