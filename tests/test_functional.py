"""The four steps on the worked example, and their edge cases."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import reference_attention, spy_on_backends
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


@pytest.mark.parametrize(("return_weights", "dropout_p"), [(True, 0.0), (False, 0.5), (False, 0.99)])
def test_lse_with_weights_or_dropout_is_refused_naming_both(return_weights: bool, dropout_p: float) -> None:
    x = torch.randn(2, 5, 4)
    message = rf"return_lse needs return_weights=False and no dropout \(got return_weights={return_weights}, "
    with pytest.raises(ValueError, match=rf"^{message}dropout_p={dropout_p}\)"):
        attention(x, x, x, backend="math", return_weights=return_weights, dropout_p=dropout_p, return_lse=True)


AUTO_CALLS = {  # what "auto" runs for each kind of call, by the rules of backends.AUTO: (T, S, options, backend)
    "weights": (5, 5, {"return_weights": True}, "math"),
    "dropout": (5, 5, {"dropout_p": 0.5}, "math"),
    "score_mod": (5, 5, {"score_mod": lambda s, b, h, q, kv: s - 0.1 * (q - kv).abs()}, "tiled"),
    "large description": (520, 520, {"mask": "window"}, "blocksparse"),
    "small description": (8, 8, {"mask": "window"}, "sdpa"),
    "causal T != S": (3, 5, {"causal": True}, "blocksparse"),
    "causal T == S": (5, 5, {"causal": True}, "sdpa"),
    "causal T != S with a tensor mask": (3, 5, {"causal": True, "mask": "tensor"}, "sdpa"),
    "a decoding step": (1, 5, {"causal": True}, "sdpa"),  # one query sees every key: no causal mask left
    "plain": (5, 5, {}, "sdpa"),
}


@pytest.mark.parametrize("case", list(AUTO_CALLS))
def test_auto_runs_the_backend_its_rules_name(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The call's mask, causal flag, score_mod and shape all reach the choice, and the answer is the reference's."""
    from selfattention import masks

    t, s, options, expected = AUTO_CALLS[case]
    g = torch.Generator().manual_seed(11)
    q, k, v = (
        torch.randn(1, 2, t, 8, generator=g),
        torch.randn(1, 2, s, 8, generator=g),
        torch.randn(1, 2, s, 8, generator=g),
    )
    options = dict(options)
    if options.get("mask") == "window":
        options["mask"] = masks.sliding_window(4)
    elif options.get("mask") == "tensor":
        options["mask"] = torch.rand(t, s, generator=g) > 0.3
    seen = spy_on_backends(monkeypatch)
    out = attention(q, k, v, **options)
    assert [name for name, _ in seen] == [expected]
    if "dropout_p" in options:
        return
    out = out[0] if isinstance(out, tuple) else out
    mask = options.get("mask")
    if isinstance(mask, masks.MaskDescription):
        mask = mask.materialize(1, 1, t, s)[0, 0]
    scores = q.double() @ k.double().mT / 8**0.5
    if "score_mod" in options:
        scores = options["score_mod"](scores, 0, 0, torch.arange(t).view(t, 1), torch.arange(s))
        want = torch.softmax(scores, -1) @ v.double()
    else:
        want, _ = reference_attention(q, k, v, mask=mask, causal=options.get("causal", False))
    assert_close(out.double(), want, atol=2e-6, rtol=1e-5)  # float32 against float64, |z| < 3


@pytest.mark.parametrize(
    ("t", "s", "align", "as_flag"),
    [(3, 5, "bottom_right", True), (5, 5, "top_left", True), (3, 5, "top_left", False)],
)
def test_a_causal_description_reaches_the_fused_kernel_as_its_flag(
    t: int, s: int, align: str, as_flag: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``masks.causal()`` is the causal flag (the fused kernel's fast path, no mask built) where the two mean the
    same: bottom-right always, top-left only with T == S (else it stays a mask, aligned as it says)."""
    from selfattention import masks

    g = torch.Generator().manual_seed(12)
    q, k, v = torch.randn(2, t, 8, generator=g), torch.randn(2, s, 8, generator=g), torch.randn(2, s, 8, generator=g)
    seen = spy_on_backends(monkeypatch)
    out = attention(q, k, v, mask=masks.causal(align), backend="sdpa")  # type: ignore[arg-type]
    ((name, options),) = seen
    assert name == "sdpa"
    assert (options["mask"] is None, options["causal"]) == (as_flag, as_flag)
    top_left = torch.ones(t, s, dtype=torch.bool).tril()
    want, _ = reference_attention(
        q, k, v, causal=align == "bottom_right", mask=None if align == "bottom_right" else top_left
    )
    assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_bounds_are_trusted_and_the_inputs_not_scanned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from selfattention import checks

    g = torch.Generator().manual_seed(13)
    q, k, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    scans: list[int] = []
    real = checks._largest
    monkeypatch.setattr(checks, "_largest", lambda *tensors: scans.extend(t.numel() for t in tensors) or real(*tensors))
    out = attention(q, k, v, bounds=(5.0, 5.0, 5.0))
    assert scans == []
    assert_close(out.double(), reference_attention(q, k, v)[0], atol=2e-6, rtol=1e-5)
    attention(q, k, v)  # without bounds each input is scanned once
    assert scans == [q.numel(), k.numel(), v.numel()]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_an_overflow_that_too_small_bounds_let_through_is_caught_at_the_output(backend: str) -> None:
    q = k = torch.full((3, 4), 1e20)  # scores of 4e40: beyond float32
    with pytest.raises(ValueError, match=r"^the attention output is not finite although the inputs are"):
        attention(q, k, torch.randn(3, 4), bounds=(1.0, 1.0, 1.0), backend=backend)


def test_values_of_width_zero_still_return_the_weights() -> None:
    g = torch.Generator().manual_seed(14)
    q, k = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    context, weights = attention(q, k, torch.empty(2, 5, 0), return_weights=True)
    assert context.shape == (2, 3, 0)
    assert_close(weights.double(), reference_attention(q, k, k)[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("t", "s", "e"), [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
def test_an_empty_result_runs_no_backend(t: int, s: int, e: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_on_backends(monkeypatch)
    q, k, v = torch.randn(2, 3, t, 4), torch.randn(2, 3, s, 4), torch.randn(2, 3, s, e)
    for backend in ("loop", "math", "sdpa", "tiled", "blocksparse", "auto"):
        assert torch.equal(attention(q, k, v, backend=backend), torch.zeros(2, 3, t, e))
    assert seen == []


@pytest.mark.parametrize("backend", ["auto", "sdpa", "blocksparse", "tiled", "math", "loop"])
@pytest.mark.parametrize("scale", [0.0, -0.7])
@pytest.mark.parametrize(("num_queries", "causal_as"), [(12, "flag"), (12, "description"), (5, "flag")])
def test_a_scale_of_zero_or_below_gives_the_reference_with_causal_masks(
    backend: str, scale: float, num_queries: int, causal_as: str
) -> None:
    """PyTorch's fused kernels return NaN (float32) or zero rows (bfloat16) in their causal mode for a scale
    <= 0; attention() hands them the same scores with a positive scale (-q and |scale|, or 0 · q and 1)."""
    from selfattention import masks

    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, num_queries, 8, generator=g, requires_grad=True)
    k, v = torch.randn(2, 12, 8, generator=g, requires_grad=True), torch.randn(2, 12, 8, generator=g)
    options = {"causal": True} if causal_as == "flag" else {"mask": masks.causal()}
    out = attention(q, k, v, scale=scale, backend=backend, **options)
    want, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, scale=scale)
    assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    dq, dk = torch.autograd.grad(out, (q, k), grad)
    want_dq, want_dk = torch.autograd.grad(want, (q, k), grad.double())
    assert_close(dq.double(), want_dq.double(), atol=2e-6, rtol=1e-5)
    assert_close(dk.double(), want_dk.double(), atol=2e-6, rtol=1e-5)
    if scale == 0:
        assert not dq.any()  # the scores do not depend on q


def test_a_negative_scale_in_bfloat16_is_not_zeroed() -> None:
    """The case that was silently wrong: bfloat16, causal through the fused kernel, a negative scale."""
    g = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g).bfloat16() for _ in range(3))
    out = attention(q, k, v, causal=True, scale=-0.5)
    want, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, scale=-0.5)
    assert (out.double() - want).abs().max() < 2e-2  # bfloat16 rounding (module docstring of test_cuda.py)


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto", "loop", "tiled", "blocksparse"])
def test_a_learned_float_mask_gets_its_gradient_or_is_refused(backend: str) -> None:
    """A bias that requires grad: the backends that differentiate it agree with the reference; "tiled" and
    "blocksparse" use masks as constants, so they refuse it (before, its gradient was silently dropped)."""
    g = torch.Generator().manual_seed(23)
    q, k, v = (
        torch.randn(1, 2, 5, 4, generator=g),
        torch.randn(1, 2, 6, 4, generator=g),
        torch.randn(1, 2, 6, 3, generator=g),
    )
    bias = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    if backend in ("tiled", "blocksparse"):
        with pytest.raises(ValueError, match=rf"^backend '{backend}' gives no gradient to a float mask that requires"):
            attention(q, k, v, mask=bias, backend=backend)
        with torch.no_grad():  # nothing to differentiate: taken as it is
            assert_close(attention(q, k, v, mask=bias, backend=backend), attention(q, k, v, mask=bias.detach()))
        return
    out = attention(q, k, v, mask=bias, backend=backend)
    want, _ = reference_attention(q.double(), k.double(), v.double(), mask=bias.double())
    grad = torch.randn(out.shape, generator=g)
    (got,) = torch.autograd.grad(out, bias, grad)
    (expected,) = torch.autograd.grad(want, bias, grad.double())
    assert_close(got.double(), expected.double(), atol=1e-6, rtol=1e-5)
