"""Every backend against the float64 reference and against PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import reference_attention
from selfattention import BACKENDS, attention

NAMES = list(BACKENDS)
# Float32 against float64: errors come from float32 rounding of sums over S and D terms; 2e-5 absolute is
# ~100 ulps of values of order 1, ample for S, D <= 129 (observed max ~1e-6).
ATOL, RTOL = 2e-5, 1e-5


def _inputs(b: int, h: int, g: int, t: int, s: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=gen)
    k = torch.randn(b, g, s, d, generator=gen)
    v = torch.randn(b, g, s, d, generator=gen)
    return q, k, v


def _random_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[..., 0] = True  # keep one key per row so that PyTorch's kernel has no NaN rows to compare
    return mask


LENGTHS = [(1, 1), (3, 3), (15, 15), (65, 65), (129, 129), (3, 15), (15, 65)]
HEAD_DIMS = [1, 3, 64, 111]


def _cases(lengths: list[tuple[int, int]], limit: int) -> list[tuple[str, int, int]]:
    """(backend, T, S) combinations; the slow loop backend takes the shorter ones (and test_loop_backend_long)."""
    return [(b, t, s) for b in NAMES for t, s in lengths if b != "loop" or t * s <= limit]


@pytest.mark.parametrize(("backend", "t", "s"), _cases(LENGTHS, 15 * 65))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_dense_equals_reference_and_sdpa(backend: str, t: int, s: int, d: int) -> None:
    q, k, v = _inputs(2, 2, 2, t, s, d)
    out = attention(q, k, v, backend=backend)
    assert_close(out, reference_attention(q, k, v)[0].float(), atol=ATOL, rtol=RTOL)
    assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=RTOL)


def test_loop_backend_long() -> None:
    q, k, v = _inputs(1, 2, 2, 129, 129, 3)
    assert_close(
        attention(q, k, v, backend="loop", causal=True),
        reference_attention(q, k, v, causal=True)[0].float(),
        atol=ATOL,
        rtol=RTOL,
    )


MASK_SHAPES = {
    "(T,S)": lambda b, h, t, s: (t, s),
    "(B,1,1,S)": lambda b, h, t, s: (b, 1, 1, s),
    "(B,H,T,S)": lambda b, h, t, s: (b, h, t, s),
}


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("shape_name", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(("t", "s", "d"), [(15, 15, 3), (65, 65, 64), (3, 15, 111)])
def test_masks_equal_reference_and_sdpa(backend: str, shape_name: str, kind: str, t: int, s: int, d: int) -> None:
    b, h = 2, 3
    q, k, v = _inputs(b, h, h, t, s, d, seed=1)
    mask = _random_mask(MASK_SHAPES[shape_name](b, h, t, s), seed=2)
    if kind == "float":
        bias = torch.randn(mask.shape, generator=torch.Generator().manual_seed(4))
        mask = bias.masked_fill(~mask, float("-inf"))
    out = attention(q, k, v, mask=mask, backend=backend)
    assert_close(out, reference_attention(q, k, v, mask=mask)[0].float(), atol=ATOL, rtol=RTOL)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("backend", "t", "s"), _cases([(1, 1), (15, 15), (65, 65), (1, 65), (3, 15), (15, 129)], 15 * 129)
)
def test_causal_aligns_bottom_right(backend: str, t: int, s: int) -> None:
    q, k, v = _inputs(2, 2, 2, t, s, 8, seed=3)
    out = attention(q, k, v, causal=True, backend=backend)
    assert_close(out, reference_attention(q, k, v, causal=True)[0].float(), atol=ATOL, rtol=RTOL)
    bottom_right = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right), atol=ATOL, rtol=RTOL)
    if t == s:
        assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize(("h", "g"), [(4, 1), (4, 2), (6, 3), (4, 4)])
def test_grouped_query_heads(backend: str, h: int, g: int) -> None:
    q, k, v = _inputs(2, h, g, 15, 15, 8, seed=4)
    out = attention(q, k, v, causal=True, backend=backend)
    assert_close(out, reference_attention(q, k, v, causal=True)[0].float(), atol=ATOL, rtol=RTOL)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", NAMES)
def test_causal_and_mask_combine(backend: str) -> None:
    q, k, v = _inputs(1, 2, 2, 9, 9, 4, seed=5)
    mask = _random_mask((9, 9), seed=6)
    out = attention(q, k, v, mask=mask, causal=True, backend=backend)
    assert_close(out, reference_attention(q, k, v, mask=mask, causal=True)[0].float(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(NAMES, 2)))
def test_backends_agree_on_gradients(a: str, b: str) -> None:
    grads = []
    for backend in (a, b):
        q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 7, 11, 5, seed=7))
        mask = _random_mask((7, 11), seed=8)
        attention(q, k, v, mask=mask, causal=True, backend=backend).pow(2).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for ga, gb in zip(*grads, strict=True):
        assert_close(ga, gb, atol=1e-5, rtol=1e-5)


def test_auto_picks_the_fused_kernel_unless_weights_are_wanted() -> None:
    from selfattention.backends import choose_backend

    assert choose_backend("auto", return_weights=False, dropout_p=0.0, mask=None, causal=True).name == "sdpa"
    assert choose_backend("auto", return_weights=True, dropout_p=0.1, mask=None, causal=False).name == "math"


def test_auto_sends_dropout_to_the_explicit_weights() -> None:
    # One routing policy: the modules pass "auto" through, so their dropout in training acts on α as the
    # reference does, and attention(..., dropout_p=p) draws exactly the mask that backend="math" draws.
    from selfattention.backends import choose_backend

    assert choose_backend("auto", return_weights=False, dropout_p=0.1, mask=None, causal=True).name == "math"
    q, k, v = _inputs(2, 2, 2, 5, 5, 4, seed=3)
    torch.manual_seed(11)
    auto = attention(q, k, v, causal=True, dropout_p=0.3)
    torch.manual_seed(11)
    _, weights = attention(q, k, v, causal=True, dropout_p=0.3, backend="math", return_weights=True)
    assert_close(auto, weights @ v)


def test_an_unknown_backend_name_is_one_error_from_one_place() -> None:
    from selfattention.backends import check_name

    with pytest.raises(ValueError, match=r"unknown backend 'fast'; choose one of \['auto', 'loop'"):
        check_name("fast")
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        attention(x, x, x, backend="fast")
