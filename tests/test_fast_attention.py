"""The tiled and block-sparse backends, and every backend with mask descriptions, against float64.

The reference is the matrix ("math") backend in float64 on the materialised boolean mask. Tile sizes are
set to 64 here (they are 256/512 by default) so that lengths 63, 64, 65, 127, 129 straddle tile edges.
"""

from __future__ import annotations

import math

import pytest
import torch

from selfattention import attention, masks
from selfattention.backends import BACKENDS, blocksparse, choose_backend, tiled
from selfattention.functional import materialize_mask


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tiled, "BLOCK_Q", 64)
    monkeypatch.setattr(tiled, "BLOCK_K", 32)
    monkeypatch.setattr(blocksparse, "BLOCK", 64)


def make_inputs(b, h, t, s, d, *, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=gen, dtype=dtype)
    k = torch.randn(b, h, s, d, generator=gen, dtype=dtype)
    v = torch.randn(b, h, s, d, generator=gen, dtype=dtype)
    return q, k, v


def with_grads(q, k, v, grad, **kwargs):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def reference(q, k, v, grad, *, mask, causal=False, **kwargs):
    """float64 math backend on the materialised mask (kwargs: score_mod is not used here)."""
    if isinstance(mask, masks.MaskDescription):
        mask = materialize_mask(mask, q, k.shape[-2])
    q, k, v, grad = (x.double() for x in (q, k, v, grad))
    return with_grads(q, k, v, grad, mask=mask, causal=causal, backend="math")


def describe(name, t, s):
    ids = torch.arange(s) * 5 // max(s, 1)  # five packed documents
    return {
        "none": None,
        "causal": masks.causal(),
        "window": masks.sliding_window(17),
        "documents": masks.documents(ids) if t <= s else masks.padding([s, max(s - 3, 0)]),
        "padding": masks.padding([s, max(s - 40, 0)]),
        "prefix": masks.prefix_lm(min(20, s)),
        "docs&causal": masks.documents(ids) & masks.causal() if t <= s else masks.causal(),
    }[name]


FAST = ["tiled", "blocksparse"]
LENGTHS_AND_WIDTHS = [(1, 8), (2, 1), (63, 9), (64, 64), (65, 111), (127, 8), (129, 9)]
MASK_NAMES = ["none", "causal", "window", "documents", "padding", "prefix", "docs&causal"]
# every length with four of the seven masks (rotating), so that each mask meets several lengths and widths
CASES = [(t, d, MASK_NAMES[(i + j) % 7]) for i, (t, d) in enumerate(LENGTHS_AND_WIDTHS) for j in (0, 2, 4, 5)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("t", "d", "mask"), CASES)
def test_fast_backends_equal_the_float64_reference(backend, t, d, mask):
    q, k, v = make_inputs(2, 2, t, t, d)
    grad = torch.randn(2, 2, t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    rule = describe(mask, t, t)
    got = with_grads(q, k, v, grad, mask=rule, backend=backend)
    want = reference(q, k, v, grad, mask=rule)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["tiled", "blocksparse", "sdpa", "math", "auto"])
@pytest.mark.parametrize(("t", "s"), [(65, 129), (129, 65), (1, 64)])
@pytest.mark.parametrize("mask", ["causal", "window", "padding", "docs&causal"])
def test_every_backend_takes_descriptions_with_t_not_s(backend, t, s, mask):
    q, k, v = make_inputs(2, 3, t, s, 9, seed=1)
    grad = torch.randn(2, 3, t, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    rule = describe(mask, t, s)
    got = with_grads(q, k, v, grad, mask=rule, backend=backend)
    want = reference(q, k, v, grad, mask=rule)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("t", "mask"), [(1023, "causal"), (1025, "window")])
def test_long_odd_lengths_with_default_tiles(backend, t, mask, monkeypatch):
    monkeypatch.undo()  # the default tile sizes
    q, k, v = make_inputs(1, 1, t, t, 8, seed=2)
    grad = torch.randn(1, 1, t, 8, dtype=torch.float64)
    rule = describe(mask, t, t)
    for a, b in zip(with_grads(q, k, v, grad, mask=rule, backend=backend), reference(q, k, v, grad, mask=rule),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["tiled", "blocksparse", "sdpa", "math", "loop"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_fully_masked_rows_give_zeros_and_finite_gradients(backend, as_tensor):
    t = 40
    rule = masks.from_function(lambda b, h, q, kv: (q % 7 != 3) & (kv <= q))
    q, k, v = make_inputs(1, 2, t, t, 5, dtype=torch.float32, seed=3)
    mask = rule.materialize(1, 2, t, t) if as_tensor else rule
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, mask=mask, backend=backend)
    out.sum().backward()
    assert bool((out[..., 3::7, :] == 0).all())
    for x in (q, k, v):
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert bool((q.grad[..., 3::7, :] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["tiled", "blocksparse"])
@pytest.mark.parametrize("mask", ["causal", "documents"])
def test_error_at_most_twice_the_book_code_in_the_same_dtype(dtype, backend, mask):
    """FlashAttention's rule: max|ours - ref64| <= 2 max|book-style in dtype - ref64|, values and grads.

    The book-style code is softmax(Q Kᵀ · scale) V written with plain tensor operations in ``dtype``
    (its own rounding is the yardstick); the reference is the same in float64 from the same inputs.
    """
    q, k, v = make_inputs(1, 2, 200, 200, 64, dtype=dtype, seed=4)
    grad = torch.randn(1, 2, 200, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    rule = describe(mask, 200, 200)
    allowed = rule.materialize(1, 2, 200, 200)

    def book(q, k, v):
        scores = (q @ k.transpose(-2, -1) * (1 / 8)).masked_fill(~allowed, -math.inf)
        return torch.softmax(scores, dim=-1) @ v

    def run(fn, q, k, v, g):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = fn(q, k, v)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), g))

    ref = run(book, *(x.double() for x in (q, k, v)), grad.double())
    naive = run(book, q, k, v, grad)
    ours = run(lambda q, k, v: attention(q, k, v, mask=rule, backend=backend), q, k, v, grad)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, naive, ref, strict=True):
        ours_err = float((a.double() - r).abs().max())
        book_err = float((b.double() - r).abs().max())
        assert ours_err <= 2 * book_err, f"{name}: {ours_err} > 2 * {book_err}"


def alibi(score, b, h, q_idx, kv_idx):
    return score - 0.5 * (h + 1) * (q_idx - kv_idx).abs()


def test_score_mod_through_attention_picks_tiled_and_matches_the_reference():
    q, k, v = make_inputs(2, 3, 70, 70, 8, seed=6)
    grad = torch.randn(2, 3, 70, 8, dtype=torch.float64)
    got = with_grads(q, k, v, grad, causal=True, score_mod=alibi)
    heads = torch.arange(3).view(3, 1, 1)
    positions = torch.arange(70)
    bias = -0.5 * (heads + 1) * (positions.view(-1, 1) - positions).abs()
    want = reference(q, k, v, grad, mask=bias.double(), causal=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="'sdpa' does not take a score_mod"):
        attention(q, k, v, score_mod=alibi, backend="sdpa")


def test_grouped_heads_and_leading_dims_work_in_the_fast_backends():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 2, 4, 40, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 2, 40, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 2, 40, 8, generator=gen, dtype=torch.float64)
    want = attention(q, k, v, mask=masks.sliding_window(9), backend="math")
    for backend in FAST:
        got = attention(q, k, v, mask=masks.sliding_window(9), backend=backend)
        torch.testing.assert_close(got, want)
    two_d = attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], causal=True, backend="blocksparse")
    torch.testing.assert_close(two_d, attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], causal=True, backend="math"))


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ({"return_weights": True, "mask": masks.causal()}, "math"),
        ({"dropout_p": 0.1}, "math"),
        ({"score_mod": alibi}, "tiled"),
        ({"mask": masks.sliding_window(256), "shape": (4096, 4096)}, "blocksparse"),
        ({"mask": masks.sliding_window(256), "shape": (64, 64)}, "sdpa"),
        ({"mask": masks.sliding_window(256), "shape": (512, 512)}, "sdpa"),  # measured faster up to 512²
        ({"mask": masks.sliding_window(256), "shape": (513, 512)}, "blocksparse"),
        ({"causal": True, "shape": (100, 300)}, "blocksparse"),
        ({"causal": True, "shape": (300, 300)}, "sdpa"),
        ({"mask": torch.ones(3, 3, dtype=torch.bool), "causal": True, "shape": (3, 5)}, "sdpa"),
        ({}, "sdpa"),
    ],
)
def test_auto_follows_its_rules(call, expected):
    options = {"return_weights": False, "dropout_p": 0.0, "mask": None, "causal": False, "shape": (8, 8)}
    assert choose_backend("auto", **(options | call)) is BACKENDS[expected]


def test_fast_backends_refuse_dropout_and_weights():
    q = torch.randn(4, 3)
    for backend in FAST:
        with pytest.raises(ValueError, match="does not support dropout"):
            attention(q, q, q, dropout_p=0.5, backend=backend)
        with pytest.raises(ValueError, match="cannot return the weights"):
            attention(q, q, q, return_weights=True, backend=backend)


@pytest.mark.parametrize(("t", "s"), [(70, 70), (30, 70), (70, 30)])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_a_causal_description_equals_its_tensor_through_auto(t, s, align):
    """``masks.causal()`` becomes the ``causal=True`` fast path only where the two are the same mask."""
    q, k, v = make_inputs(1, 2, t, s, 8, seed=10)
    rule = masks.causal(align=align)
    got = attention(q, k, v, mask=rule)
    want = attention(q, k, v, mask=rule.materialize(1, 2, t, s), backend="math")
    torch.testing.assert_close(got, want)
