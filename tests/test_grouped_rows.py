"""Grouped-query heads computed as rows of one query block (``functional.fold_query_groups``).

When every query row of a head sees the same keys (one query, or no causal mask; a mask the same for every head
and row), the query heads sharing a key/value head are stacked as rows instead of repeating K and V. These
tests compare that path with the float64 reference that repeats the heads, and check the cases that must not
take it.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import reference_attention
from selfattention import attention
from selfattention.backends import BACKENDS
from selfattention.checks import _largest_score
from selfattention.functional import (
    _foldable,
    broadcast_inputs,
    expand_kv_heads,
    fold_query_groups,
    unfold_query_groups,
)

NAMES = [name for name in BACKENDS if name != "flex"]
TOL = {"atol": 2e-6, "rtol": 1e-5}  # float32 against float64: a few ulps of the results (|z| < 3)


def _qkv(batch: int, heads: int, kv_heads: int, t: int, s: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, t, 8, generator=g),
        torch.randn(batch, kv_heads, s, 8, generator=g),
        torch.randn(batch, kv_heads, s, 8, generator=g),
    )


def test_fold_puts_the_heads_of_a_group_in_its_rows_and_unfold_undoes_it() -> None:
    q = torch.arange(2 * 6 * 3 * 4.0).reshape(2, 6, 3, 4)  # (B, H, T, D), H = 6 heads in G = 2 groups
    folded = fold_query_groups(q, 2)
    assert folded.shape == (2, 2, 9, 4)
    assert torch.equal(folded[1, 1, 3:6], q[1, 4])  # group 1 holds heads 3, 4, 5: its rows 3..5 are head 4
    assert torch.equal(unfold_query_groups(folded, 3), q)


@pytest.mark.parametrize("backend", NAMES)
def test_decoding_step_with_a_padding_mask_equals_repeated_heads(backend: str) -> None:
    q, k, v = _qkv(2, 6, 2, 1, 13, seed=1)
    padding = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    padding[1, ..., :4] = False  # the second row of the batch starts with 4 padding tokens
    assert _foldable(q, k, padding, True, None)
    want, want_weights = reference_attention(q, k, v, mask=padding, causal=True)
    assert_close(attention(q, k, v, mask=padding, causal=True, backend=backend), want.float(), **TOL)
    if BACKENDS[backend].returns_weights:
        _, weights = attention(q, k, v, mask=padding, causal=True, backend=backend, return_weights=True)
        assert weights.shape == (2, 6, 1, 13)
        assert_close(weights, want_weights.float(), **TOL)


@pytest.mark.parametrize("backend", NAMES)
def test_several_queries_without_a_causal_mask_equal_repeated_heads(backend: str) -> None:
    q, k, v = _qkv(1, 4, 2, 5, 7, seed=2)
    assert _foldable(q, k, None, False, None)
    assert_close(attention(q, k, v, backend=backend), reference_attention(q, k, v)[0].float(), **TOL)


@pytest.mark.parametrize(
    ("t", "causal", "mask_shape"),
    [
        (5, True, None),  # rows of a causal mask see different keys
        (2, True, None),  # already with two queries: the first one does not see the last key
        (1, False, (1, 4, 1, 7)),  # a mask per head
        (3, False, (1, 1, 3, 7)),  # a mask per query row
    ],
)
def test_masks_that_differ_between_rows_keep_the_heads_apart(t: int, causal: bool, mask_shape: tuple | None) -> None:
    q, k, v = _qkv(1, 4, 2, t, 7, seed=3)
    mask = None
    if mask_shape is not None:
        mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(4)) > 0.4
        mask[..., -1] = True
    assert not _foldable(q, k, mask, causal, None)
    want = reference_attention(q, k, v, mask=mask, causal=causal)[0].float()
    assert_close(attention(q, k, v, mask=mask, causal=causal, backend="math"), want, **TOL)


def test_folding_leaves_gradients_unchanged() -> None:
    grads = []
    for heads_repeated in (False, True):
        q, k, v = (x.requires_grad_() for x in _qkv(1, 6, 3, 1, 9, seed=5))
        if heads_repeated:  # the old way, G = H after repeating: nothing to fold
            out = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), backend="math")
        else:
            out = attention(q, k, v, backend="math")
        out.pow(2).sum().backward()
        grads.append([x.grad for x in (q, k, v)])
    for folded, repeated in zip(*grads, strict=True):
        assert_close(folded, repeated, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bounds", [(float("nan"), 1.0, 1.0), (1.0, float("inf"), 1.0), (1.0, -1.0, 1.0), (1.0, 1.0)])
def test_bounds_that_cannot_be_bounds_are_refused(bounds: tuple[float, ...]) -> None:
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"bounds must be three finite numbers >= 0"):
        attention(q, k, v, bounds=bounds)  # type: ignore[arg-type]


@pytest.mark.parametrize(("t", "s", "mask"), [(5, 5, None), (5, 5, "padding"), (1, 9, None), (1, 9, "padding")])
def test_the_fused_kernel_gets_grouped_heads_uncopied(
    t: int, s: int, mask: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sdpa on the CPU maps the heads itself (enable_gqa), unfolded: the causal prefill (rows see different keys)
    and a decoding step (one query, which the bottom-right causal mask lets see every key: no mask is built)."""
    q, k, v = _qkv(2, 6, 2, t, s, seed=7)
    padding = torch.ones(2, 1, 1, s, dtype=torch.bool) if mask else None
    if padding is not None:
        padding[1, ..., s - 2 :] = False
    seen: list[tuple[int, int, bool, bool]] = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options: object) -> torch.Tensor:
        seen.append((query.shape[-3], key.shape[-3], bool(options.get("enable_gqa")), options.get("attn_mask") is None))
        return fused(query, key, value, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = attention(q, k, v, causal=True, mask=padding, backend="sdpa")
    # 6 query heads and 2 key/value heads reached the kernel (not 6 copies, not 2 folded blocks); a mask only
    # where the call has one (padding, or the causal triangle of the prefill: 5 queries, 5 keys is its fast path)
    assert seen == [(6, 2, True, padding is None)]
    want, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, mask=padding)
    assert_close(out.double(), want, **TOL)


def test_the_overflow_check_reads_grouped_heads_as_the_kernel_does() -> None:
    """With grouped keys, ``max |q·k|`` pairs query head h with key/value head h // (H/G), as attention does."""
    q = torch.zeros(1, 4, 1, 2)
    q[0, 3, 0, 0] = 1.0  # only head 3 is non-zero: it reads key/value head 1
    k = torch.zeros(1, 2, 3, 2)
    k[0, 0, 0, 0], k[0, 1, 2, 0] = 100.0, 7.0
    assert _largest_score(q, k) == 7.0  # head 3 never meets the 100 of key/value head 0


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "causal"),
    [
        ((2, 6, 5, 8), (2, 2, 7, 8), False),  # (B, H, T, D), several queries, no mask
        ((6, 5, 8), (2, 7, 8), False),  # (H, T, D): no batch dimension
        ((6, 1, 8), (2, 7, 8), True),  # a decoding step without a batch dimension (causal allows every key)
    ],
)
def test_an_eager_backend_gets_the_key_value_heads_uncopied(
    q_shape: tuple, kv_shape: tuple, causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every row of a head sees the same keys, ``"math"`` gets the G key/value heads and H/G query heads
    as rows of each, batched or not: no copy of K and V per query head."""
    import dataclasses

    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(q_shape, generator=g), torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g)
    assert _foldable(q, k, None, causal, None)
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = BACKENDS["math"].fn

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options: object):
        seen.append((tuple(query.shape), tuple(key.shape)))
        return real(query, key, value, **options)

    monkeypatch.setitem(BACKENDS, "math", dataclasses.replace(BACKENDS["math"], fn=spy))
    out = attention(q, k, v, causal=causal, backend="math")
    *lead, heads, t, d = q_shape
    assert seen == [((*lead, 2, heads // 2 * t, d), kv_shape)]
    assert_close(out, reference_attention(q, k, v, causal=causal)[0].float(), **TOL)


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_a_score_mod_sees_the_query_head_not_its_group(backend: str, t: int) -> None:
    """ALiBi-like slopes per query head with grouped key/value heads: folding the heads of a group into rows
    would hand the score_mod the group's index; it must get each query head's own."""
    q, k, v = _qkv(2, 4, 2, t, 7, seed=9)

    def alibi(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        return score - (h + 1) * 0.5 * (q_idx + 7 - t - kv_idx).abs()

    out = attention(q, k, v, score_mod=alibi, backend=backend)
    heads = torch.arange(4).view(4, 1, 1)
    rows, cols = torch.arange(t).view(t, 1), torch.arange(7)
    scores = q.double() @ k.double().repeat_interleave(2, 1).mT / 8**0.5
    want = torch.softmax(alibi(scores, 0, heads, rows, cols), -1) @ v.double().repeat_interleave(2, 1)
    assert_close(out.double(), want, **TOL)


def test_broadcast_inputs_repeats_grouped_heads_unless_told_to_keep_them() -> None:
    q, k, v = torch.randn(3, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 7)
    query, key, value = broadcast_inputs(q, k, v)  # (B, H, T, D), (B, H, S, D), (B, H, S, E)
    assert torch.equal(query, q)
    assert torch.equal(key, k.repeat_interleave(2, 1).expand(3, 4, 6, 8))
    assert torch.equal(value, v.repeat_interleave(2, 1).expand(3, 4, 6, 7))
    query, key, value = broadcast_inputs(q, k, v, keep_kv_heads=True)
    assert torch.equal(key, k.expand(3, 2, 6, 8)) and torch.equal(value, v.expand(3, 2, 6, 7))
    query, key, value = broadcast_inputs(q[0], k[0], v[0])  # (H, T, D) and (G, S, D): no batch dimension
    assert torch.equal(key, k[0].repeat_interleave(2, 0)) and torch.equal(value, v[0].repeat_interleave(2, 0))


def test_expand_kv_heads_repeats_each_head_for_its_group() -> None:
    k, v = torch.randn(2, 6, 8), torch.randn(2, 6, 3)  # (G, S, D): no batch dimension
    key, value = expand_kv_heads(torch.randn(4, 5, 8), k, v)
    assert torch.equal(key, k[[0, 0, 1, 1]]) and torch.equal(value, v[[0, 0, 1, 1]])  # head h reads h // 2
    one = torch.randn(1, 1, 6, 8)
    assert torch.equal(expand_kv_heads(torch.randn(1, 3, 5, 8), one, one)[0], one.expand(1, 3, 6, 8))
    for q, kv in [(torch.randn(5, 8), torch.randn(2, 6, 8)), (torch.randn(4, 5, 8), torch.randn(6, 8))]:
        key, value = expand_kv_heads(q, kv, kv)  # no head dimension on one side: nothing to repeat
        assert key is kv and value is kv
    same = torch.randn(4, 6, 8)
    assert expand_kv_heads(torch.randn(4, 5, 8), same, same)[0] is same


@pytest.mark.parametrize("kv_heads", [3, 0])
def test_expand_kv_heads_refuses_heads_that_do_not_divide(kv_heads: int) -> None:
    kv = torch.randn(kv_heads, 6, 8)
    message = rf"^query heads \(4\) must be a multiple of key/value heads \({kv_heads}\) for grouped-query"
    with pytest.raises(ValueError, match=message):
        expand_kv_heads(torch.randn(4, 5, 8), kv, kv)
