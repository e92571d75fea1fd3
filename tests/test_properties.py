"""Properties of attention that hold for any input (hypothesis draws the shapes and values)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from selfattention import attention, attention_scores, attention_weights

shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 6))  # B, T, S, D
backends = st.sampled_from(["loop", "math", "sdpa"])
seeds = st.integers(0, 2**31 - 1)


def _draw(shape: tuple[int, int, int, int], seed: int) -> tuple[torch.Tensor, ...]:
    b, t, s, d = shape
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, t, d, generator=g),
        torch.randn(b, s, d, generator=g),
        torch.randn(b, s, d, generator=g),
    )


@settings(max_examples=60, deadline=None)
@given(shapes, seeds, st.floats(0.0, 1.0))
def test_rows_of_weights_sum_to_one_or_zero_when_fully_masked(shape, seed: int, density: float) -> None:
    q, k, _ = _draw(shape, seed)
    mask = torch.rand(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(seed)) < density
    weights = attention_weights(attention_scores(q, k), mask=mask, scale=0.5)
    sums = weights.sum(-1)
    want = mask.any(-1).float()
    assert_close(sums, want)
    assert (weights >= 0).all() and torch.isfinite(weights).all()


@settings(max_examples=40, deadline=None)
@given(shapes, seeds, backends)
def test_permuting_tokens_permutes_the_output(shape, seed: int, backend: str) -> None:
    b, t, _, d = shape
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(seed + 1))
    out = attention(x, x, x, backend=backend)
    assert_close(attention(x[:, perm], x[:, perm], x[:, perm], backend=backend), out[:, perm], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(shapes, seeds, backends)
def test_causal_outputs_ignore_future_tokens(shape, seed: int, backend: str) -> None:
    b, t, _, d = shape
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))
    cut = int(torch.randint(0, t, (1,), generator=torch.Generator().manual_seed(seed)).item())
    changed = x.clone()
    changed[:, cut + 1 :] = torch.randn_like(changed[:, cut + 1 :]) * 10
    before = attention(x, x, x, causal=True, backend=backend)[:, : cut + 1]
    after = attention(changed, changed, changed, causal=True, backend=backend)[:, : cut + 1]
    assert_close(after, before)


@settings(max_examples=40, deadline=None)
@given(shapes, seeds, backends)
def test_equal_keys_give_the_mean_of_the_values(shape, seed: int, backend: str) -> None:
    q, k, v = _draw(shape, seed)
    k = k[:, :1].expand_as(k)  # every key the same: every score in a row is equal
    out = attention(q, k, v, backend=backend)
    assert_close(out, v.mean(dim=1, keepdim=True).expand_as(out), atol=1e-5, rtol=1e-5)
