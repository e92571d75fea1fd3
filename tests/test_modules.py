"""The ladder SelfAttentionV1 -> SelfAttention -> CausalAttention: the chapter-3 numbers, weight copies, a
float64 reference built from the math core, dropout, gradients and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from conftest import counts, spy_on_backends
from selfattention import CausalAttention, SelfAttention, SelfAttentionV1
from selfattention.examples import embeddings
from selfattention.functional import attention_scores, attention_weights, causal_mask, context_vectors
from selfattention.modules import AttentionModule


def reference(x, w_query, w_key, w_value, *, causal=False):
    """The three steps in float64 with matrices in the ``x @ W`` layout."""
    x = x.double()
    q, k, v = x @ w_query.double(), x @ w_key.double(), x @ w_value.double()
    num_tokens = x.shape[-2]
    mask = causal_mask(num_tokens, num_tokens) if causal else None
    weights = attention_weights(attention_scores(q, k), mask=mask, scale=1 / math.sqrt(k.shape[-1]))
    return context_vectors(weights, v)


def linear_matrices(module):
    return [getattr(module, name).weight.T for name in ("W_query", "W_key", "W_value")]


def test_v1_reproduces_the_chapter_numbers():
    torch.manual_seed(123)
    context = SelfAttentionV1(3, 2)(embeddings())
    assert context.shape == (6, 2)
    assert_close(context[0], torch.tensor([0.2996, 0.8053]), atol=1e-4, rtol=0)
    assert_close(context[1], torch.tensor([0.3061, 0.8210]), atol=1e-4, rtol=0)


def test_v1_parameters_are_created_in_order():
    torch.manual_seed(123)
    expected = [torch.rand(3, 2) for _ in range(3)]
    torch.manual_seed(123)
    module = SelfAttentionV1(3, 2)
    assert [name for name, _ in module.named_parameters()] == ["W_query", "W_key", "W_value"]
    for got, want in zip((module.W_query, module.W_key, module.W_value), expected, strict=True):
        assert_close(got.detach(), want)


@pytest.mark.parametrize("shape", [(6, 3), (2, 6, 3), (2, 2, 5, 3)])
def test_v1_equals_float64_reference(shape):
    torch.manual_seed(0)
    module = SelfAttentionV1(3, 4)
    x = torch.rand(shape)
    want = reference(x, module.W_query, module.W_key, module.W_value)
    assert_close(module(x).double(), want, atol=1e-6, rtol=1e-5)


def test_weights_copy_between_v1_and_linear_both_ways():
    torch.manual_seed(1)
    v1, linear = SelfAttentionV1(3, 2), SelfAttention(3, 2)
    x = embeddings()
    linear.load_from(v1)
    assert_close(linear.W_query.weight, v1.W_query.T)
    # Same weights, same math, but not the same kernel: nn.Linear computes x @ Wᵀ with a transposed GEMM and V1
    # computes x @ W, and a BLAS may sum the three products in another order (seen with MKL on AVX-512): the
    # outputs may then differ by a few float32 ulps of the intermediate values, which are of order 1 (measured:
    # 1.2e-7 at most). A wrong copy (a missing transpose, a swapped matrix) changes them by 1e-2 or more.
    exact = {"atol": 4 * torch.finfo(torch.float32).eps, "rtol": 0.0}
    assert_close(linear(x), v1(x), **exact)
    other = SelfAttention(3, 2)
    v1.load_from(other)
    assert_close(v1(x), other(x), **exact)


def test_weight_copy_rejects_biases_and_other_widths():
    with pytest.raises(
        ValueError, match=r"^SelfAttentionV1 has no biases; copy from a SelfAttention with qkv_bias=False$"
    ):
        SelfAttentionV1(3, 2).load_from(SelfAttention(3, 2, qkv_bias=True))
    with pytest.raises(ValueError, match=r"\(3, 4\) module into a \(3, 2\)"):
        SelfAttentionV1(3, 2).load_from(SelfAttention(3, 4))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_self_attention_equals_float64_reference(qkv_bias):
    torch.manual_seed(2)
    module = SelfAttention(5, 4, qkv_bias=qkv_bias)
    x = torch.randn(3, 7, 5)
    if qkv_bias:
        # fold the bias into the reference as an extra input column of ones
        ones = torch.ones(*x.shape[:-1], 1)
        mats = [
            torch.cat([getattr(module, n).weight.T, getattr(module, n).bias[None]])
            for n in ("W_query", "W_key", "W_value")
        ]
        want = reference(torch.cat([x, ones], -1), *mats)
    else:
        want = reference(x, *linear_matrices(module))
    assert_close(module(x).double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 3), (6, 3)])
def test_causal_attention_equals_float64_reference(shape):
    torch.manual_seed(3)
    module = CausalAttention(3, 2, context_length=6, dropout=0.5).eval()
    x = torch.rand(shape)
    want = reference(x, *linear_matrices(module), causal=True)
    assert_close(module(x).double(), want, atol=1e-6, rtol=1e-5)
    # the first token sees only itself: its context is its own value vector
    assert_close(module(x)[..., 0, :], module.W_value(x)[..., 0, :])


def test_causal_attention_dropout_only_in_training():
    torch.manual_seed(4)
    module = CausalAttention(3, 8, context_length=6, dropout=0.5)
    x = torch.rand(2, 6, 3)
    module.eval()
    eval_out = module(x)
    assert torch.equal(eval_out, module(x))
    module.train()
    torch.manual_seed(5)
    first = module(x)
    torch.manual_seed(5)
    assert torch.equal(first, module(x))
    assert not torch.allclose(first, eval_out)


def test_gradients_reach_every_matrix():
    torch.manual_seed(6)
    for module in (SelfAttentionV1(3, 2), SelfAttention(3, 2, qkv_bias=True), CausalAttention(3, 2, 6, 0.0)):
        module(torch.rand(2, 6, 3)).square().sum().backward()
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.parametrize(
    ("make", "x", "message"),
    [
        (lambda: SelfAttention(3, 2), torch.rand(6, 4), r"input width \(4\) must equal d_in \(3\)"),
        (lambda: CausalAttention(3, 2, 6, 0.0), torch.rand(1, 7, 3), "7 tokens exceed context_length=6"),
    ],
)
def test_errors_name_the_values(make, x, message):
    with pytest.raises(ValueError, match=message):
        make()(x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval_is_rejected(p):
    with pytest.raises(ValueError, match=f"must be in \\[0, 1\\), got {p}"):
        CausalAttention(3, 2, 6, p)


def test_non_float_input_is_refused_and_named():
    with pytest.raises(TypeError, match=r"^input must be a floating-point tensor, got dtype torch.int64$"):
        SelfAttentionV1(3, 2)(torch.ones(6, 3, dtype=torch.long))


def test_attention_module_defaults():
    """A module built on AttentionModule without arguments: no dropout, the automatic backend, 1/sqrt(D)."""
    module = AttentionModule()
    assert (module.dropout, module.backend, module.scale) == (0.0, "auto", None)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_linear_projections_have_biases_exactly_when_asked(qkv_bias):
    kinds = ("weight", "bias") if qkv_bias else ("weight",)
    want = [f"{layer}.{kind}" for layer in ("W_query", "W_key", "W_value") for kind in kinds]
    for module in (SelfAttention(3, 2, qkv_bias=qkv_bias), CausalAttention(3, 2, 6, 0.0, qkv_bias=qkv_bias)):
        assert [name for name, _ in module.named_parameters()] == want


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: SelfAttentionV1(3, 4, **kw),
        lambda **kw: SelfAttention(3, 4, **kw),
        lambda **kw: CausalAttention(3, 4, 6, 0.5, **kw),
    ],
    ids=["v1", "linear", "causal"],
)
def test_the_ladder_runs_the_fused_kernel_unless_another_backend_is_named(monkeypatch, make):
    seen = spy_on_backends(monkeypatch)
    x = torch.rand(2, 6, 3)
    torch.manual_seed(0)
    auto = make().eval()
    auto(x)
    assert counts(seen) == {"sdpa": 1}
    torch.manual_seed(0)
    named = make(backend="math").eval()
    assert_close(named(x), auto(x))
    assert counts(seen) == {"sdpa": 2, "math": 1}
