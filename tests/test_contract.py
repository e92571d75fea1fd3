"""One input contract for every backend (docs/input-contract.md): hypothesis draws the inputs.

Every backend and ``"auto"`` runs on the same drawn call. Either all of them return the float64 reference's
answer (with the broadcast shape), or all of them refuse the call with the same error type and message, and
then the call is one the contract refuses. ``CONTRACT_EXAMPLES=5000`` in the environment runs a longer search
than the suite's 150 examples (about 2 minutes).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from conftest import reference_attention
from selfattention import BACKENDS, attention, masks

NAMES = [*BACKENDS, "auto"]
# Float32 against float64: rounding of sums over at most 9 keys and 6 widths of values of order 1; the
# observed error is ~1e-6 (as in backends/test_backends.py).
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    # bfloat16 keeps 8 significant bits (relative step 2^-8 = 3.9e-3): the output is rounded once, and the
    # fused kernels also round the weights before P·V. With |v| <= ~4 and at most 9 keys that stays
    # within a few steps of 4: 3e-2 (observed up to ~1.6e-2).
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
}


@dataclass
class Call:
    """One drawn attention call, and the reasons (if any) the contract refuses it."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    options: dict[str, Any]
    refused: list[type[Exception]] = field(default_factory=list)


def _sizes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Batch dimensions of the query and of the keys/values that broadcast (or, rarely, do not)."""
    full = draw(st.lists(st.integers(1, 3), max_size=2))
    q_batch = [size if draw(st.booleans()) else 1 for size in full]
    kv_batch = [size if draw(st.booleans()) else 1 for size in full]
    if full and draw(st.booleans()):  # one side leaves out its first dimension
        if draw(st.booleans()):
            q_batch = q_batch[1:]
        else:
            kv_batch = kv_batch[1:]
    clash = bool(full) and draw(st.integers(0, 9)) == 9
    if clash:  # 2 against 3: does not broadcast
        q_batch[-1:], kv_batch[-1:] = [2], [3]
    return tuple(q_batch), tuple(kv_batch), clash


@st.composite
def calls(draw: st.DrawFn) -> Call:
    refused: list[type[Exception]] = []
    q_batch, kv_batch, clash = _sizes(draw)
    if clash and (len(q_batch) == len(kv_batch) or min(len(q_batch), len(kv_batch)) > 0):
        refused.append(ValueError)
    heads, kv_heads = draw(st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1), (1, 3), (2, 1), (3, 3), (2, 3)]))
    if heads % kv_heads and heads != 1:
        refused.append(ValueError)
    t, s = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    d, e = draw(st.sampled_from([*range(1, 7), *range(1, 7), 0])), draw(st.integers(0, 6))
    if d == 0:
        refused.append(ValueError)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    query = torch.randn(*q_batch, heads, t, d, generator=gen).to(dtype)
    key = torch.randn(*kv_batch, kv_heads, s, d, generator=gen).to(dtype)
    value = torch.randn(*kv_batch, kv_heads, s, e, generator=gen).to(dtype)
    if not q_batch and draw(st.integers(0, 4)) == 0 and heads == 1:
        query = query[0]  # (T, D): no head dimension
    mixed = draw(st.sampled_from([*[None] * 18, "key", "value"]))
    if mixed == "key":
        key = key.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif mixed == "value":
        value = value.to(torch.float64 if dtype != torch.float64 else torch.float32)
    if mixed:
        refused.append(TypeError)
    size = draw(st.sampled_from(["normal"] * 17 + ["+inf scores", "-inf scores", "huge values"]))
    if size != "normal" and t * s * max(d, 1) > 0:
        refused.append(ValueError)
        if size == "huge values":
            value = torch.full_like(value, 1e308 if value.dtype == torch.float64 else 2e38)
            if not e:
                refused.pop()
        else:  # every score beyond the work dtype's range (float64 itself for float64)
            sign = 1 if size == "+inf scores" else -1
            query = torch.full_like(query, 1e160 if query.dtype == torch.float64 else 1e20)
            key = torch.full_like(key, sign * (1e160 if key.dtype == torch.float64 else 1e20))
    options: dict[str, Any] = {"causal": draw(st.booleans())}
    scale = draw(st.sampled_from([None, None, None, 0.3, 0.3, 2.0, 2.0, True]))
    if scale is not None:
        options["scale"] = scale
        if scale is True:
            refused.append(TypeError)
    kinds = [None, None, "(T, S)", "(T, 1)", "(1, S)", "(..., 1, 1, S)", "float", "window"]
    mask_kind = draw(st.sampled_from([*kinds, *kinds, "bad"]))
    if mask_kind == "window":  # a mask description: the fast backends take it as it is
        options["mask"] = masks.sliding_window(draw(st.integers(1, 4)))
    elif mask_kind is not None:
        lead = (*torch.broadcast_shapes(q_batch, kv_batch),) if not clash else ()
        shape = {"(T, S)": (t, s), "(T, 1)": (t, 1), "(1, S)": (1, s), "(..., 1, 1, S)": (*lead, 1, 1, s),
                 "float": (t, s), "bad": (t + 2, s)}[mask_kind]  # fmt: skip
        mask = torch.rand(shape, generator=gen) > 0.3
        if mask_kind == "float":
            mask = torch.randn(shape, generator=gen).masked_fill(~mask, -math.inf)
        if mask_kind == "bad":
            refused.append(ValueError)
        options["mask"] = mask
    return Call(query, key, value, options, refused)


def _outcome(call: Call, backend: str) -> torch.Tensor | tuple[type[Exception], str]:
    try:
        return attention(call.query, call.key, call.value, backend=backend, **call.options)
    except (ValueError, TypeError) as error:
        return type(error), str(error)


@settings(max_examples=int(os.environ.get("CONTRACT_EXAMPLES", 150)), deadline=None)
@given(calls())
def test_every_backend_keeps_the_contract(call: Call) -> None:
    outcomes = {name: _outcome(call, name) for name in NAMES}
    errors = {name: got for name, got in outcomes.items() if isinstance(got, tuple)}
    event("refused" if call.refused else "accepted")
    if call.refused:
        assert len(errors) == len(NAMES), f"refused by some backends only: {errors}"
        assert len(set(errors.values())) == 1, f"different errors: {errors}"
        assert errors["math"][0] in call.refused, errors["math"]
        return
    assert not errors, f"refused an input the contract accepts: {errors}"
    mask = call.options.get("mask")
    if isinstance(mask, masks.MaskDescription):  # the same rule for every batch and head: (T, S)
        mask = mask.materialize(1, 1, call.query.shape[-2], call.key.shape[-2])[0, 0]
    scale = call.options.get("scale")
    want, _ = reference_attention(
        call.query, call.key, call.value, mask=mask, causal=call.options["causal"], scale=scale
    )
    for name, got in outcomes.items():
        assert isinstance(got, torch.Tensor)
        assert got.shape == want.shape and got.dtype == call.query.dtype, (name, got.shape, want.shape)
        assert_close(got.double(), want, **TOLERANCE[call.query.dtype], msg=lambda m, name=name: f"{name}: {m}")


# --- the reproductions of the issue, and larger shapes that reach the block-sparse tiles ---


def _check_rows(out: torch.Tensor, q, k, v, rows, **options) -> None:
    """``out[i]`` against the float64 reference of ``q[i]`` (keys and values broadcast) for a few ``i``."""
    for i in rows:
        want, _ = reference_attention(q[i], k[0], v[0], **options)
        assert_close(out[i].double(), want, atol=2e-5, rtol=1e-5)


def test_a_broadcast_key_value_batch_is_read_in_bounds() -> None:
    """The issue's reproduction: 1024 queries' batches against one key/value batch (a segfault before)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1024, 4, 64, 64, generator=gen)
    k = v = torch.randn(1, 4, 128, 64, generator=gen)
    out = attention(q, k, v, causal=True)  # "auto" picks "blocksparse" for causal T != S
    assert out.shape == (1024, 4, 64, 64)
    _check_rows(out, q, k, v, [0, 1, 511, 1023], causal=True)


@pytest.mark.parametrize("backend", NAMES)
def test_the_first_key_value_batch_broadcast_over_two(backend: str) -> None:
    """``k = kv[:1]`` with a query batch of 2: the answer over that batch, not the memory beside it."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 64 if backend != "loop" else 9, 16, generator=gen)
    kv = torch.randn(2, 4, 128 if backend != "loop" else 13, 16, generator=gen)
    out = attention(q, kv[:1], kv[:1], causal=True, backend=backend)
    _check_rows(out, q, kv[:1], kv[:1], [0, 1], causal=True)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_batches_that_do_not_broadcast_are_refused_alike(kv_heads: int) -> None:
    """The message names the caller's shapes, also where grouped heads would be folded into query rows."""
    q, kv = torch.randn(2, 4, 64, 16), torch.randn(3, kv_heads, 128, 16)
    message = (
        rf"the batch dimensions of query \(2, 4, 64, 16\) and key/value \(3, {kv_heads}, 128, 16\) do not broadcast"
    )
    for backend, causal in itertools.product(NAMES, (True, False)):  # without a causal mask, rows can be folded
        with pytest.raises(ValueError, match=message):
            attention(q, kv, kv, causal=causal, backend=backend)


@pytest.mark.parametrize("backend", ["blocksparse", "auto", "tiled", "sdpa", "math"])
@pytest.mark.parametrize(("t", "s", "d", "e"), [(300, 700, 16, 24), (700, 300, 24, 8), (257, 1100, 8, 8)])
def test_broadcast_batches_and_value_widths_with_default_tiles(backend: str, t: int, s: int, d: int, e: int) -> None:
    """Several default-size tiles (256) per side, with a broadcast key/value batch and E != D; and gradients."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, t, d, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, s, d, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, s, e, generator=gen, requires_grad=True)
    grad = torch.randn(2, 2, t, e, generator=gen)
    out = attention(q, k, v, causal=True, backend=backend)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, causal=True)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad.double()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        # gradients of k and v add up over the broadcast batch and ~S/2 rows: 1e-4 absolute
        assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


NEAR_THE_LIMIT = {  # name -> (q, k, v, message of the refusal or None)
    "scores to +inf": (torch.full((3, 4), 1e20), torch.full((5, 4), 1e20), torch.randn(5, 4), "the scores overflowed"),
    "scores to -inf": (torch.full((3, 4), 1e20), torch.full((5, 4), -1e20), torch.randn(5, 4), "the scores overflowed"),
    "values summing beyond float32": (torch.randn(3, 4), torch.randn(5, 4), torch.full((5, 4), 3e38), "could overflow"),
    "large but safe values": (torch.randn(3, 4), torch.randn(5, 4), torch.full((5, 4), 1e37), None),
    "large but safe scores": (torch.full((3, 4), 1e18), torch.full((5, 4), -1e18), torch.randn(5, 4), None),
}


@pytest.mark.parametrize("case", list(NEAR_THE_LIMIT))
def test_inputs_near_the_float32_limit_get_the_same_outcome_everywhere(case: str) -> None:
    """Refused by every backend alike (a row of -inf scores is not a fully masked row), or computed by all."""
    q, k, v, message = NEAR_THE_LIMIT[case]
    if message is not None:
        for backend in NAMES:
            with pytest.raises(ValueError, match=message):
                attention(q, k, v, backend=backend)
        return
    want, _ = reference_attention(q, k, v)
    for backend in NAMES:
        assert_close(attention(q, k, v, backend=backend).double(), want, atol=0, rtol=1e-5)


@pytest.mark.parametrize("backend", NAMES)
def test_empty_calls_give_zeros_with_zero_gradients(backend: str) -> None:
    for t, s, e in [(0, 5, 4), (3, 0, 4), (3, 5, 0)]:
        q = torch.randn(2, 3, t, 4, requires_grad=True)
        k = torch.randn(2, 3, s, 4, requires_grad=True)
        v = torch.randn(2, 3, s, e, requires_grad=True)
        out = attention(q, k, v, causal=True, backend=backend)
        assert out.shape == (2, 3, t, e) and bool((out == 0).all())
        out.sum().backward()
        assert q.grad is not None and bool((q.grad == 0).all())


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_empty_calls_give_the_log_sum_exp_of_no_key(backend: str, dtype: torch.dtype) -> None:
    """A row with no key has log-sum-exp ``-inf`` (in float32, float64 for float64), one per query and head."""
    from selfattention.functional import _no_lse

    work = torch.float64 if dtype == torch.float64 else torch.float32
    for t, s, e in [(0, 5, 4), (3, 0, 4)]:
        q, k, v = (
            torch.randn(2, 3, t, 4).to(dtype),
            torch.randn(2, 3, s, 4).to(dtype),
            torch.randn(2, 3, s, e).to(dtype),
        )
        context, lse = attention(q, k, v, backend=backend, return_lse=True)
        assert torch.equal(context, torch.zeros(2, 3, t, e, dtype=dtype))
        assert torch.equal(lse, torch.full((2, 3, t), -math.inf, dtype=work))
    lse = _no_lse(torch.empty(2, 3, 7, 4, dtype=dtype, device="meta"))  # on the query's device
    assert (lse.shape, lse.dtype, lse.device.type) == ((2, 3, 7), work, "meta")


def test_empty_calls_return_weights_of_the_call_s_shape() -> None:
    """``(..., H, T, S)`` zeros, whichever side is empty (three-dimensional inputs: H = 2, D = 4)."""
    for t, s in [(0, 5), (3, 0)]:
        q, k, v = torch.randn(2, t, 4), torch.randn(2, s, 4), torch.randn(2, s, 6)
        context, weights = attention(q, k, v, backend="math", return_weights=True)
        assert torch.equal(context, torch.zeros(2, t, 6)) and torch.equal(weights, torch.zeros(2, t, s))


def test_no_key_gives_zeros_and_zero_gradients_for_large_half_precision_queries() -> None:
    """The zeros are tied to the inputs for the backward pass without summing them: 8192 half-precision
    entries of 100 sum to inf in float16, and inf times 0 would make every output NaN (then refused)."""
    for grad in (False, True):
        q = torch.full((1, 2, 64, 64), 100.0, dtype=torch.float16)
        q[0, 0, 0] = 0.0  # zeros among the entries
        q.requires_grad_(grad)
        k = torch.zeros(1, 2, 0, 64, dtype=torch.float16, requires_grad=grad)
        out = attention(q, k, k)
        assert torch.equal(out, torch.zeros(1, 2, 64, 64, dtype=torch.float16))
        if grad:
            out.float().sum().backward()
            assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("backend", NAMES)
def test_empty_calls_with_grouped_heads_give_zeros(backend: str) -> None:
    """4 query heads on 2 key/value heads, with no query, no key or no value width."""
    for t, s, e in [(0, 5, 4), (3, 0, 4), (3, 5, 0)]:
        q, k, v = torch.randn(2, 4, t, 4), torch.randn(2, 2, s, 4), torch.randn(2, 2, s, e)
        assert torch.equal(attention(q, k, v, backend=backend), torch.zeros(2, 4, t, e))
        if s * t == 0:
            context, lse = attention(q, k, v, backend=backend, return_lse=True)
            assert torch.equal(context, torch.zeros(2, 4, t, e)) and torch.equal(lse, torch.full((2, 4, t), -math.inf))


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("width", [0, 2])
def test_values_of_another_width_keep_the_log_sum_exp_of_the_keys(backend: str, width: int) -> None:
    """Values narrower than the queries (E = 0 or 2, D = 4): the log-sum-exp is that of the keys' scores, not
    the ``-inf`` of no key, and the context is the reference's (PyTorch's CPU flash kernel, behind the
    ``"sdpa"`` log-sum-exp, refuses E != D: the backend must not hand it such values)."""
    g = torch.Generator().manual_seed(15)
    q, k, v = (
        torch.randn(2, 4, 3, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 5, width, generator=g, dtype=torch.float64),
    )
    context, lse = attention(q, k, v, backend=backend, return_lse=True)
    assert context.shape == (2, 4, 3, width)
    scores = q @ k.repeat_interleave(2, 1).mT / 2  # scale 1/sqrt(4)
    want = torch.logsumexp(scores, dim=-1)
    assert_close(context, torch.softmax(scores, dim=-1) @ v.repeat_interleave(2, 1), atol=1e-12, rtol=1e-12)
    assert_close(lse, want, atol=1e-12, rtol=1e-12)
