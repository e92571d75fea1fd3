"""The four steps on the worked example, and their edge cases."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import reference_attention
from selfattention import attention, attention_scores, attention_weights, causal_mask, context_vectors
from selfattention.examples import TOKENS, embeddings

JOURNEY_SCORES = [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]
JOURNEY_WEIGHTS = [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]
JOURNEY_CONTEXT = [0.4419, 0.6515, 0.5683]


def test_worked_example_query_journey() -> None:
    x = embeddings()
    journey = TOKENS.index("journey")
    scores = attention_scores(x[journey], x)
    weights = attention_weights(scores)
    context = context_vectors(weights, x)
    assert_close(scores, torch.tensor(JOURNEY_SCORES), atol=5e-5, rtol=0)
    assert_close(weights, torch.tensor(JOURNEY_WEIGHTS), atol=5e-5, rtol=0)
    assert_close(context, torch.tensor(JOURNEY_CONTEXT), atol=5e-5, rtol=0)


def test_context_vector_has_the_embedding_width_not_the_sequence_length() -> None:
    # The widely shared notebook bug: accumulating into torch.empty(len(sequence)) gives 6 numbers.
    x = embeddings()
    context = context_vectors(attention_weights(attention_scores(x[1], x)), x)
    assert context.shape == (3,)
    assert not torch.allclose(context, torch.full((3,), 0.4371), atol=1e-3)


def test_full_weight_matrix_and_contexts_match_an_independent_float64_computation() -> None:
    rows = [[float(v) for v in row] for row in embeddings().tolist()]
    # Independent: plain Python floats and math.exp, no torch.
    import math

    want_weights, want_context = [], []
    for q in rows:
        scores = [sum(a * b for a, b in zip(q, k, strict=True)) for k in rows]
        exps = [math.exp(s) for s in scores]
        weights = [e / sum(exps) for e in exps]
        want_weights.append(weights)
        want_context.append([sum(w * v[d] for w, v in zip(weights, rows, strict=True)) for d in range(3)])
    x = embeddings()
    weights = attention_weights(attention_scores(x, x))
    assert_close(weights, torch.tensor(want_weights), atol=1e-6, rtol=0)
    assert_close(context_vectors(weights, x), torch.tensor(want_context), atol=1e-6, rtol=0)
    assert_close(weights[1], torch.tensor(JOURNEY_WEIGHTS), atol=5e-5, rtol=0)


def test_attention_with_unit_scale_reproduces_the_example_on_every_backend() -> None:
    x = embeddings()
    for backend in ("loop", "math", "sdpa", "auto"):
        assert_close(
            attention(x, x, x, scale=1.0, backend=backend)[1],
            torch.tensor(JOURNEY_CONTEXT),
            atol=5e-5,
            rtol=0,
        )


def test_fully_masked_row_gives_zero_weights_and_no_nan_gradient() -> None:
    scores = torch.randn(2, 4, 5, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    weights = attention_weights(scores, mask=mask)
    assert torch.equal(weights[:, 2], torch.zeros(2, 5))
    assert_close(weights[:, [0, 1, 3]].sum(-1), torch.ones(2, 3))
    weights.pow(2).sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[:, 2], torch.zeros(2, 5))


def test_float_mask_is_added_and_all_minus_inf_row_is_zero() -> None:
    scores = torch.zeros(3, 3)
    bias = torch.tensor([[0.0, 0.0, float("-inf")], [float("-inf")] * 3, [1.0, 0.0, 0.0]])
    weights = attention_weights(scores, mask=bias)
    assert_close(weights[0], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.equal(weights[1], torch.zeros(3))
    e = torch.tensor([1.0, 0.0, 0.0]).exp()
    assert_close(weights[2], e / e.sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32_and_returned_in_its_dtype(dtype: torch.dtype) -> None:
    scores = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)) * 30
    weights = attention_weights(scores.to(dtype))
    assert weights.dtype == dtype
    # The only error is the final rounding to the low-precision dtype (half an ulp of values <= 1).
    want = torch.softmax(scores.to(dtype).double(), -1)
    tolerance = {torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    assert (weights.double() - want).abs().max() <= tolerance


def test_causal_mask_aligns_bottom_right() -> None:
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert causal_mask(1, 4).tolist() == [[True, True, True, True]]
    assert causal_mask(3, 2).tolist() == [[False, False], [True, False], [True, True]]


def test_more_queries_than_keys_with_causal_gives_zero_rows() -> None:
    q, k = torch.randn(1, 4, 8), torch.randn(1, 2, 8)
    for backend in ("loop", "math", "sdpa"):
        out = attention(q, k, k, causal=True, backend=backend)
        assert torch.equal(out[:, :2], torch.zeros(1, 2, 8))
        assert_close(out, reference_attention(q, k, k, causal=True)[0].float())


def test_return_weights_gives_context_and_weights() -> None:
    x = embeddings()
    context, weights = attention(x, x, x, scale=1.0, return_weights=True)
    assert weights.shape == (6, 6)
    assert_close(weights[1], torch.tensor(JOURNEY_WEIGHTS), atol=5e-5, rtol=0)
    assert_close(context, weights @ x)


@pytest.mark.parametrize("backend", ["loop", "math", "sdpa"])
def test_no_nan_gradient_through_fully_masked_rows(backend: str) -> None:
    q = torch.randn(2, 3, 4, requires_grad=True)
    k = torch.randn(2, 5, 4, requires_grad=True)
    v = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[1] = False
    out = attention(q, k, v, mask=mask, backend=backend)
    assert torch.equal(out[:, 1], torch.zeros(2, 4))
    out.sum().backward()
    for tensor in (q, k, v):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def test_gradcheck_math_backend_in_float64() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, mask=mask, backend="math"), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=True, backend="loop"), (q, k, v))


def test_dropout_zeroes_weights_and_rescales_the_survivors() -> None:
    x = torch.randn(1, 64, 8)
    torch.manual_seed(0)
    _, weights = attention(x, x, x, dropout_p=0.5, backend="math", return_weights=True)
    _, plain = attention(x, x, x, backend="math", return_weights=True)
    kept = weights != 0
    assert 0.4 < kept.float().mean().item() < 0.6
    assert_close(weights[kept], plain[kept] * 2)
