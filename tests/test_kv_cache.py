"""Rolling KV caches: what they keep, that they never grow, and that positions stay consistent for RoPE.

The defining property (StreamingLLM): one attention call over a sinks + window cache equals attention over
exactly the kept tokens, recomputed from scratch at positions 0 .. S - 1. A one-layer model's keys and values
depend on nothing but the token and its position, so for such a model the property holds for the whole model:
its logits equal a plain forward pass over the kept tokens.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_rotary_gpt as tiny
from selfattention import KVCache as PublicKVCache
from selfattention.generate import generate
from selfattention.kv_cache import CachePolicy, KVCache, RollingKVCache
from selfattention.models.gpt import GPT
from selfattention.modules import KVCache as ModulesKVCache
from selfattention.modules import MultiHeadAttention
from selfattention.streaming import feed, make_caches

pytestmark = pytest.mark.usefixtures("one_thread")


def stream(model: GPT, ids: torch.Tensor, policy: CachePolicy) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Logits of every step, feeding one token at a time, and the stream indices kept after each step."""
    caches = make_caches(model, 1, policy, max_len=len(ids))
    logits, kept = [], []
    with torch.no_grad():
        for t in range(len(ids)):
            logits.append(feed(model, ids[t : t + 1].view(1, 1), caches)[0, -1])
            cache = caches[0]
            kept.append(cache.kept() if isinstance(cache, RollingKVCache) else list(range(t + 1)))
    return logits, kept


def test_kv_cache_is_one_class_wherever_it_is_imported() -> None:
    assert PublicKVCache is ModulesKVCache is KVCache


def test_rolling_cache_keeps_the_sinks_and_the_latest_in_stream_order() -> None:
    cache = RollingKVCache(1, 1, 2, window=3, sinks=2)
    for t in range(9):
        token = torch.full((1, 1, 1, 2), float(t))
        keys, values = cache.update(token, -token)
        assert keys.shape[2] == cache.length == min(t + 1, 5)  # never past sinks + window
        assert cache.keys.shape[2] == 5  # the buffer itself never grows
    assert cache.kept() == [0, 1, 6, 7, 8]
    assert keys[0, 0, :, 0].tolist() == [0.0, 1.0, 6.0, 7.0, 8.0]
    assert values[0, 0, :, 0].tolist() == [-0.0, -1.0, -6.0, -7.0, -8.0]
    window = RollingKVCache(1, 1, 2, window=3)
    for t in range(9):
        window.update(torch.full((1, 1, 2, 2), float(t)), torch.zeros(1, 1, 2, 2))  # two tokens at a time
    assert window.kept() == [15, 16, 17] and window.seen == 18
    cache.reset()
    assert (cache.length, cache.seen, cache.kept()) == (0, 0, [])


def test_rolling_cache_errors() -> None:
    with pytest.raises(ValueError, match="window must be at least 1, got 0"):
        RollingKVCache(1, 1, 2, window=0)
    with pytest.raises(ValueError, match="sinks must be at least 0, got -1"):
        RollingKVCache(1, 1, 2, window=2, sinks=-1)
    with pytest.raises(ValueError, match=r"rotary tables of shapes \(4, 2\) and \(4, 2\) must both be"):
        RollingKVCache(1, 1, 2, window=3, sinks=2, rotary=(torch.ones(4, 2), torch.ones(4, 2)))
    cache = RollingKVCache(1, 1, 2, window=3, sinks=2)
    cache.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    with pytest.raises(ValueError, match="4 new tokens do not fit a cache of 2 sinks \\+ a window of 3"):
        cache.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    with pytest.raises(ValueError, match="unknown cache policy 'ring'"):
        CachePolicy("ring")
    with pytest.raises(ValueError, match="2 sinks \\+ a window of 31 tokens must fit context_length=32"):
        make_caches(tiny(), 1, CachePolicy("sinks", window=31, sinks=2))
    with pytest.raises(ValueError, match="learned absolute positions"):
        make_caches(tiny(rope=False), 1, CachePolicy("window", window=8))


@pytest.mark.parametrize("kind", ["full", "window", "sinks"])
def test_every_policy_equals_the_full_cache_while_nothing_is_evicted(kind: str) -> None:
    model = tiny(num_layers=2)
    ids = torch.randint(13, (20,), generator=torch.Generator().manual_seed(1))
    reference, _ = stream(model, ids, CachePolicy("full"))
    logits, kept = stream(model, ids, CachePolicy(kind, window=20 - (4 if kind == "sinks" else 0)))
    assert kept[-1] == list(range(20))
    for step, (ours, theirs) in enumerate(zip(logits, reference, strict=True)):
        assert torch.equal(ours, theirs), f"step {step}"  # the same operations on the same numbers


@pytest.mark.parametrize(("sinks", "kv_heads"), [(4, 2), (1, 1), (0, 4)])
def test_sinks_and_window_equal_attention_over_the_kept_tokens_at_their_cache_positions(
    sinks: int, kv_heads: int
) -> None:
    """One layer: after every step, the logits equal a fresh pass over exactly the kept tokens."""
    model = tiny(num_kv_heads=kv_heads)
    ids = torch.randint(13, (40,), generator=torch.Generator().manual_seed(2))
    logits, kept = stream(model, ids, CachePolicy("sinks" if sinks else "window", window=6, sinks=sinks))
    assert kept[-1] == [*range(sinks), *range(34, 40)]
    with torch.no_grad():
        for step, (ours, tokens) in enumerate(zip(logits, kept, strict=True)):
            fresh = model(ids[tokens].view(1, -1))[0][0, -1]  # positions 0 .. S - 1, no cache
            assert_close(ours, fresh, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_the_property_holds_per_attention_module_with_another_rotary_hook() -> None:
    """A bare MultiHeadAttention (grouped-query) with the cache rotating by a table of another base."""
    torch.manual_seed(3)
    module = MultiHeadAttention(8, 16, 64, 0.0, num_heads=4, num_kv_heads=2).eval()
    width = 4
    inv_freq = 500.0 ** (-torch.arange(0, width, 2) / width)
    angles = torch.outer(torch.arange(64.0), inv_freq).repeat(1, 2)  # (L, D) rotate-half layout
    cos, sin = angles.cos(), angles.sin()

    def rope(q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(start, start + q.shape[-2])
        rotate = lambda x: x * cos[rows] + torch.cat([-x[..., 2:], x[..., :2]], -1) * sin[rows]  # noqa: E731
        return rotate(q), rotate(k)

    cache = RollingKVCache(1, 2, width, window=5, sinks=3, rotary=(cos, sin))
    x = torch.randn(1, 30, 8)
    with torch.no_grad():
        module(x[:, :6], kv_cache=cache, rope=rope)  # a prompt of 6, then one at a time
        for t in range(6, 30):
            out = module(x[:, t : t + 1], kv_cache=cache, rope=rope)
            fresh = module(x[:, cache.kept()], rope=rope)[:, -1:]  # the kept tokens alone, positions 0 .. 7
            assert_close(out, fresh, rtol=1e-5, atol=1e-6, msg=f"step {t}")
    assert cache.kept() == [0, 1, 2, 25, 26, 27, 28, 29]


def test_keys_rotated_before_caching_would_break_the_property() -> None:
    """The bug the scheme avoids: keys cached already rotated keep the place they entered at, which drifts.

    Without the tables the cache stores what the model's own hook rotated, at the token's place on entry.
    """
    model = tiny()
    ids = torch.randint(13, (30,), generator=torch.Generator().manual_seed(4))
    right = make_caches(model, 1, CachePolicy("sinks", window=6, sinks=2))
    stale: list[KVCache] = [RollingKVCache(1, 2, 4, window=6, sinks=2)]  # no rotary: keys rotated on entry
    with torch.no_grad():
        for t in range(30):
            token = ids[t : t + 1].view(1, 1)
            ours, theirs = feed(model, token, right)[0, -1], feed(model, token, stale)[0, -1]
            fresh = model(ids[stale[0].kept()].view(1, -1))[0][0, -1]  # type: ignore[attr-defined]
            assert_close(ours, fresh, rtol=1e-5, atol=1e-5)
            if t < 8:  # nothing evicted yet: both agree
                assert_close(theirs, fresh, rtol=1e-5, atol=1e-5)
    assert (theirs - fresh).abs().max() > 1e-3


def test_generate_goes_past_the_context_with_a_constant_cache() -> None:
    model = tiny(num_layers=2)
    prompt = torch.randint(13, (2, 10), generator=torch.Generator().manual_seed(5))
    out = generate(model, prompt, 60, temperature=0.0, cache=CachePolicy("sinks", window=12))  # 70 > 32 tokens
    assert out.shape == (2, 70) and torch.equal(out[:, :10], prompt)
    short = generate(model, prompt, 6, temperature=0.0, cache="window")  # window = the context: nothing evicted
    assert torch.equal(short, generate(model, prompt, 6, temperature=0.0))
    with pytest.raises(ValueError, match="'sinks' cache policy needs use_cache=True"):
        generate(model, prompt, 4, cache="sinks", use_cache=False)
    with pytest.raises(ValueError, match="learned absolute positions"):
        generate(tiny(rope=False), prompt, 4, cache="window")


def test_a_refused_call_leaves_a_rolling_cache_consistent() -> None:
    """A call refused after the cache was written (scores overflowing) forgets its tokens; evicted ones stay out."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(4, 4, 64, 0.0, num_heads=2, num_kv_heads=1).eval()
    cache = RollingKVCache(1, 1, 2, window=3, sinks=1)
    with torch.no_grad():
        mha(torch.randn(1, 4, 4), kv_cache=cache)  # 4 tokens: the sink and the latest 3
        assert (cache.length, cache.kept()) == (4, [0, 1, 2, 3])
        with pytest.raises(ValueError, match="overflow"):
            mha(torch.full((1, 1, 4), 3e19), kv_cache=cache)  # evicts token 1, then the scores overflow
        assert (cache.length, cache.seen, cache.kept()) == (3, 4, [0, 2, 3])
        before = cache.keys[:, :, : cache.length].clone()
        mha(torch.randn(1, 1, 4), kv_cache=cache)  # the next good call appends after the kept tokens
        assert (cache.length, cache.kept()) == (4, [0, 2, 3, 4])
        assert_close(cache.keys[:, :, :3], before)


def _rope_tables(positions: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(positions)[:, None] * 10000 ** (-torch.arange(width // 2) / (width // 2))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("rolling", [False, True])
def test_cache_bounds_are_never_below_what_attention_reads(rolling: bool) -> None:
    """The bounds a cache hands to attention hold for the keys it returns, rotated ones included."""
    generator = torch.Generator().manual_seed(3)
    cache: KVCache = (
        RollingKVCache(2, 1, 8, window=5, sinks=2, rotary=_rope_tables(7, 8)) if rolling else KVCache(2, 1, 16, 8)
    )
    for step in range(12 if rolling else 4):
        scale = 1.0 + 4 * (step == 1)  # one loud step early: the bound must remember it after eviction
        key = torch.randn(2, 1, 1, 8, generator=generator) * scale
        value = torch.randn(2, 1, 1, 8, generator=generator) * scale
        query = torch.randn(2, 1, 1, 8, generator=generator)
        keys, values = cache.update(key, value)
        rotated = cache.rotate_queries(query)
        bound_q, bound_k, bound_v = cache.bounds(query.abs().max().item())
        assert rotated.abs().max().item() <= bound_q
        assert keys.abs().max().item() <= bound_k and values.abs().max().item() <= bound_v
    assert bound_v >= 5 * 0.5  # the loud step is remembered (loose, never too small)
    cache.reset()
    assert cache.bounds(0.0) == (0.0, 0.0, 0.0)


def test_a_cache_refuses_what_its_buffers_cannot_hold() -> None:
    cache = KVCache(1, 1, 4, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"do not fit a cache of torch.float16 \(largest 6.55e\+04\)"):
        cache.update(torch.full((1, 1, 1, 2), 7e4), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match="key contains a non-finite value nan"):
        cache.update(torch.full((1, 1, 1, 2), float("nan")), torch.zeros(1, 1, 1, 2))
    assert cache.length == 0


def test_overflow_is_still_refused_when_the_cache_supplies_the_bounds() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(4, 4, 16, 0.0, num_heads=2, num_kv_heads=1).eval()
    cache = KVCache(1, 1, 16, 2)
    with torch.no_grad():
        mha(torch.randn(1, 3, 4), kv_cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            mha(torch.full((1, 1, 4), 3e19), kv_cache=cache)
    assert cache.length == 3
