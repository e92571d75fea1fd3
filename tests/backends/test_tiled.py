"""The tiled kernel's building blocks against the float64 matrix reference: values, gradients, merging."""

from __future__ import annotations

import math

import pytest
import torch

from selfattention import masks
from selfattention.backends.tiled import merge_partials, tiled_backward, tiled_forward


def reference(q, k, v, *, scale, allowed=None, score_mod=None):
    """Book-style attention in float64 with autograd, from a materialised boolean mask."""
    scores = q @ k.transpose(-2, -1) * scale
    if score_mod is not None:
        t, s = scores.shape[-2:]
        b = torch.arange(scores.shape[0]).view(-1, 1, 1, 1) if scores.dim() == 4 else torch.tensor(0)
        h = torch.arange(scores.shape[-3]).view(-1, 1, 1) if scores.dim() >= 3 else torch.tensor(0)
        scores = score_mod(scores, b, h, torch.arange(t).unsqueeze(-1), torch.arange(s))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    exp = torch.exp(scores - row_max)
    total = exp.sum(-1, keepdim=True)
    return (exp / torch.where(total > 0, total, 1.0)) @ v


def inputs(*shape_q, keys, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    *lead, t, d = shape_q
    q = torch.randn(*lead, t, d, generator=gen, dtype=dtype)
    k = torch.randn(*lead, keys, d, generator=gen, dtype=dtype)
    v = torch.randn(*lead, keys, d + 1, generator=gen, dtype=dtype)
    return q, k, v


def grads_of(fn, q, k, v, grad):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize(("t", "s", "block_q", "block_k"), [(1, 1, 4, 4), (9, 9, 4, 4), (13, 7, 4, 3), (5, 17, 8, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_equal_the_reference(t, s, block_q, block_k, causal):
    q, k, v = inputs(2, 3, t, 5, keys=s)
    allowed = torch.ones(t, s, dtype=torch.bool).tril(s - t) if causal else None
    grad = torch.randn(2, 3, t, 6, dtype=torch.float64)
    want = grads_of(lambda q, k, v: reference(q, k, v, scale=0.4, allowed=allowed), q, k, v, grad)
    options = {"scale": 0.4, "causal": causal, "block_q": block_q, "block_k": block_k}
    out, lse = tiled_forward(q, k, v, **options)
    got = (out, *tiled_backward(q, k, v, out, lse, grad, **options))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_lse_is_the_row_log_sum_exp_and_minus_inf_for_rows_with_no_key():
    q, k, v = inputs(6, 4, keys=5)
    allowed = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed[2] = False
    out, lse = tiled_forward(q, k, v, scale=0.5, mask=allowed, block_q=4, block_k=2)
    want = torch.logsumexp((q @ k.T * 0.5).masked_fill(~allowed, -math.inf), dim=-1)
    torch.testing.assert_close(lse, want)
    assert lse[2] == -math.inf and bool((out[2] == 0).all())
    grads = tiled_backward(q, k, v, out, lse, torch.ones_like(out), scale=0.5, mask=allowed, block_q=4, block_k=2)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((grads[0][2] == 0).all())


def test_float_mask_is_added_and_mask_description_equals_its_tensor():
    q, k, v = inputs(2, 11, 3, keys=11)
    bias = torch.randn(11, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, _ = tiled_forward(q, k, v, scale=1.0, mask=bias, block_q=4, block_k=4)
    weights = torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1)
    torch.testing.assert_close(out, weights @ v)
    described = masks.documents([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]) & masks.causal()
    as_tensor = described.materialize(1, 2, 11, 11)[0]
    a, lse_a = tiled_forward(q, k, v, scale=1.0, mask=described, block_q=4, block_k=4)
    b, lse_b = tiled_forward(q, k, v, scale=1.0, mask=as_tensor, block_q=4, block_k=4)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(lse_a, lse_b)


def alibi(score, b, h, q_idx, kv_idx):
    return score - (h + 1) * 0.25 * (q_idx - kv_idx).abs()


def soft_cap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


@pytest.mark.parametrize("score_mod", [alibi, soft_cap])
def test_score_mod_values_and_gradients(score_mod):
    q, k, v = inputs(2, 10, 4, keys=10, seed=3)
    q, k = q * 3, k * 3  # large scores, so that soft-capping bites
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    grad = torch.randn(2, 10, 5, dtype=torch.float64)
    want = grads_of(lambda q, k, v: reference(q, k, v, scale=0.5, allowed=allowed, score_mod=score_mod),
                    q, k, v, grad)  # fmt: skip
    options = {"scale": 0.5, "causal": True, "score_mod": score_mod, "block_q": 3, "block_k": 4}
    out, lse = tiled_forward(q, k, v, **options)
    got = (out, *tiled_backward(q, k, v, out, lse, grad, **options))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_parts_over_disjoint_keys_merge_to_the_whole_forward_and_backward():
    """Keys split in two chunks (as ring attention does): merged partials and per-part gradients."""
    q, k, v = inputs(2, 12, 4, keys=12, seed=4)
    grad = torch.randn(2, 12, 5, dtype=torch.float64)
    full = tiled_forward(q, k, v, scale=0.5, causal=True, block_q=5, block_k=5)
    rule = masks.causal()
    parts = [
        (k[:, :7], v[:, :7], 0),
        (k[:, 7:], v[:, 7:], 7),
    ]
    results = [
        tiled_forward(q, k_p, v_p, scale=0.5, mask=rule, kv_offset=off, total=(12, 12), block_q=5, block_k=3)
        for k_p, v_p, off in parts
    ]
    out, lse = merge_partials(*results[0], *results[1])
    torch.testing.assert_close(out, full[0])
    torch.testing.assert_close(lse, full[1])
    dq_full, dk_full, dv_full = tiled_backward(q, k, v, *full, grad, scale=0.5, causal=True)
    dq = torch.zeros_like(q)
    for (k_p, v_p, off), stop in zip(parts, (7, 12), strict=True):
        dq_p, dk_p, dv_p = tiled_backward(
            q, k_p, v_p, out, lse, grad, scale=0.5, mask=rule, kv_offset=off, total=(12, 12), block_k=2
        )
        dq += dq_p
        torch.testing.assert_close(dk_p, dk_full[:, off:stop])
        torch.testing.assert_close(dv_p, dv_full[:, off:stop])
    torch.testing.assert_close(dq, dq_full)


def test_merge_partials_handles_empty_sides():
    out = torch.ones(3, 2)
    lse = torch.tensor([0.5, -math.inf, -math.inf])
    other = torch.full((3, 2), 2.0)
    other_lse = torch.tensor([-math.inf, 1.0, -math.inf])
    merged, merged_lse = merge_partials(out, lse, other, other_lse)
    torch.testing.assert_close(merged, torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(merged_lse, torch.tensor([0.5, 1.0, -math.inf]))
