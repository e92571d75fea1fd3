"""Text generation from a language model, one token at a time, with or without a KV cache.

Without a cache every step runs the model on the whole sequence so far. With one (``use_cache=True``), the
prompt is run once (``prefill``, in chunks of ``prefill_chunk`` tokens if given) to fill a preallocated
cache per layer, and each step then runs only the newest token, whose keys and values are appended. Both
paths give the same logits (to float32 rounding) and, greedily, the same tokens.

Context overflow: a prompt plus output longer than the model's ``context_length`` is an error unless
``slide=True``. Sliding without a cache conditions each step on the last ``context_length`` tokens; with a
cache, when it is full it is refilled from the last ``context_length // 2`` tokens and decoding continues
(so the two paths then see different amounts of context and may differ).

Rolling caches (``cache="window"`` or ``"sinks"``, see :mod:`selfattention.kv_cache`) go past the context
without refilling and without ``slide``: the cache keeps a constant number of tokens and evicts the oldest
(after the sinks). They need a rotary model. The prompt goes through them in chunks of at most half the window
(``prefill_chunk`` if smaller), so that every prompt token still sees at least half a window before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from selfattention.kv_cache import CachePolicy, KVCache, RollingKVCache
from selfattention.streaming import feed, make_caches


class CausalLM(Protocol):
    """What :func:`generate` needs: a config with ``context_length``, caches, and ``model(idx, kv_caches=)``."""

    @property
    def config(self) -> Any:
        """Has ``context_length``."""
        ...

    def make_kv_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One cache per layer."""
        ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(idx, kv_caches=...)`` returns ``(logits (B, T, V), loss or None)``."""
        ...


def next_token_probs(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """The distribution :func:`sample_next` samples from: ``softmax(logits / temperature)`` over the top ``k``.

    With ``top_k``, every token outside the ``top_k`` largest logits of its row gets probability 0 (ties
    with the ``k``-th logit are kept), and the rest are renormalised.

    Args:
        logits: ``(B, V)``. temperature: greater than 0. top_k: at least 1 (more than ``V`` keeps all).

    Returns:
        ``(B, V)`` float32 probabilities, each row summing to 1.

    Raises:
        ValueError: for a temperature that is not a finite number > 0, or one so small the logits
            overflow, ``top_k < 1``, or a row of logits whose largest entry is not finite.

    >>> next_token_probs(torch.tensor([[0.0, 2.0, 1.0]]), top_k=2)
    tensor([[0.0000, 0.7311, 0.2689]])
    """
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 to sample, got {temperature}")
    _check_logits(logits)
    logits = logits.float() / temperature
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):  # a tiny temperature overflows the logits
        raise ValueError(f"temperature {temperature} is too small to sample with; use 0 for greedy decoding")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _check_logits(logits: Tensor) -> None:
    """Raise ValueError naming the first row of ``logits (B, V)`` whose largest entry is not finite: a NaN,
    a ``+inf`` or a row of ``-inf`` leaves no token to choose (``-inf`` for some tokens is allowed)."""
    peak = logits.amax(dim=-1)  # NaN propagates
    bad = ~torch.isfinite(peak)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"the logits of row {row} are not usable: largest {float(peak[row])} (a NaN, +inf, or -inf for "
            "every token); the model's output is broken"
        )


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from ``logits (B, V)``: greedy when ``temperature == 0``, else sample.

    Sampling draws from :func:`next_token_probs`.

    Returns:
        ``(B, 1)`` token ids.

    Raises:
        ValueError: for a negative, infinite, NaN or overflowing temperature, ``top_k < 1`` (also when
            greedy), or a row of logits whose largest entry is not finite (NaN, ``+inf``, all ``-inf``).
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:  # checked for greedy decoding too, which does not use it
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if temperature == 0:
        _check_logits(logits)
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k)
    draw_on = probs.device if generator is None else generator.device  # a CPU generator for a CUDA model
    return torch.multinomial(probs.to(draw_on), 1, generator=generator).to(probs.device)


@torch.no_grad()
def generate(
    model: CausalLM,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    prefill_chunk: int | None = None,
    slide: bool = False,
    on_token: Callable[[Tensor], None] | None = None,
    eos_token_id: int | None = None,
    cache: CachePolicy | str = "full",
) -> Tensor:
    """Continue ``idx (B, T0)`` by ``max_new_tokens`` tokens; returns ``(B, T0 + max_new_tokens)``.

    Without ``slide`` the KV caches hold ``T0 + max_new_tokens`` positions, not the whole context.

    Args:
        model: a causal language model such as :class:`selfattention.GPT` (put in eval mode by the caller).
        idx: the prompt's token ids, at least one per row.
        temperature: 0 for greedy decoding. top_k: sample only among the ``top_k`` likeliest tokens.
        generator: the random source of sampling; one on another device than the model (a CPU generator
            for a CUDA model) draws there, so that a seed samples the same way on every device.
        use_cache: decode with a KV cache. prefill_chunk: feed the prompt to the cache this many tokens at
            a time (default: all at once).
        slide: allow output beyond the context (see the module docstring).
        on_token: called with each new ``(B, 1)`` token (for streaming output).
        eos_token_id: a row that has produced this token gets it again at every later position (its end
            is padded with it, as Hugging Face's ``generate`` pads with its default pad token), and
            generation stops once every row has produced it (the output is then shorter).
        cache: the cache policy: ``"full"``, ``"window"``, ``"sinks"`` (defaults) or a :class:`CachePolicy`.

    Raises:
        ValueError: an empty prompt, prompt plus output beyond the context without ``slide`` (full cache),
            or a rolling cache without ``use_cache`` or for a model with learned positions.
    """
    policy = cache if isinstance(cache, CachePolicy) else CachePolicy(cache)
    rolling = policy.kind != "full"  # goes past the context by itself
    context = int(model.config.context_length)
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"the prompt must be (batch, tokens) with at least one token, got {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    total = idx.shape[1] + max_new_tokens
    if total > context and not slide and not rolling:
        raise ValueError(
            f"prompt ({idx.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's context_length={context}; shorten them, or allow sliding (slide=True, learned positions) or "
            "use a rolling cache (cache='window' or 'sinks', rotary positions)"
        )
    if idx.shape[1] > context and not slide and not rolling:
        raise ValueError(f"the prompt has {idx.shape[1]} tokens, more than context_length={context}")
    cache_len = context if slide else min(context, total)
    if rolling:
        step = _rolling_stepper(model, idx.shape[0], policy, prefill_chunk, use_cache)
    else:
        step = (
            _cached_stepper(model, idx, context, prefill_chunk, cache_len)
            if use_cache
            else _full_stepper(model, context)
        )
    logits = step(idx, None)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
        if eos_token_id is not None:  # rows that have ended stay ended
            token = token.masked_fill(finished[:, None], eos_token_id)
        idx = torch.cat([idx, token], dim=1)
        if on_token is not None:
            on_token(token)
        if eos_token_id is not None:
            finished |= token[:, 0] == eos_token_id
            if bool(finished.all()):
                break
        if _ < max_new_tokens - 1:
            logits = step(idx, token)
    return idx


Stepper = Callable[[Tensor, Tensor | None], Tensor]


def _full_stepper(model: CausalLM, context: int) -> Stepper:
    """Each step: the whole sequence (its last ``context`` tokens) through the model."""

    def step(idx: Tensor, new: Tensor | None) -> Tensor:
        return model(idx[:, -context:])[0][:, -1, :]

    return step


def _rolling_stepper(
    model: CausalLM, batch_size: int, policy: CachePolicy, chunk: int | None, use_cache: bool
) -> Stepper:
    """The prompt in chunks of at most half the window, then one token per step, through rolling caches."""
    if not use_cache:
        raise ValueError(f"the {policy.kind!r} cache policy needs use_cache=True")
    caches = make_caches(model, batch_size, policy)
    window = cast(RollingKVCache, caches[0]).window
    size = min(chunk or window, max(1, window // 2))

    def step(idx: Tensor, new: Tensor | None) -> Tensor:
        tokens = idx if new is None else new
        logits = None
        for begin in range(0, tokens.shape[1], size):
            logits = feed(model, tokens[:, begin : begin + size], caches)
        assert logits is not None
        return logits[:, -1, :]

    return step


def _cached_stepper(model: CausalLM, prompt: Tensor, context: int, chunk: int | None, cache_len: int) -> Stepper:
    """Prefill the caches with the prompt, then one token per step; refill when the cache is full."""
    caches = model.make_kv_caches(prompt.shape[0], cache_len)

    def prefill(tokens: Tensor) -> Tensor:
        for cache in caches:
            cache.reset()
        size = chunk or tokens.shape[1]
        logits = None
        for begin in range(0, tokens.shape[1], size):
            logits = model(tokens[:, begin : begin + size], kv_caches=caches)[0]
        assert logits is not None
        return logits[:, -1, :]

    def step(idx: Tensor, new: Tensor | None) -> Tensor:
        if new is None:
            return prefill(idx[:, -context:])
        if caches[0].length >= context:  # full: keep the last half of the context and refill
            return prefill(idx[:, -max(1, context // 2) :])
        return model(new, kv_caches=caches)[0][:, -1, :]

    return step
