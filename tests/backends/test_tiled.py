"""The tiled kernel's building blocks against the float64 matrix reference: values, gradients, merging."""

from __future__ import annotations

import math

import pytest
import torch

from selfattention import masks
from selfattention.backends import tiled
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


def squash(score, b, h, q_idx, kv_idx):
    return torch.tanh(score)  # tanh's backward reads its own output: the backward kernel must not overwrite it


def alibi_in_place(score, b, h, q_idx, kv_idx):
    return score.sub_((h + 1) * 0.25 * (q_idx - kv_idx).abs()).mul_(0.5)  # edits the scores it is given


@pytest.mark.parametrize("score_mod", [alibi, soft_cap, squash, alibi_in_place])
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


def test_merge_partials_of_two_empty_sides_has_zero_gradients():
    """logaddexp(-inf, -inf) has a NaN gradient in PyTorch; a row empty on both sides must not pass it on."""
    lse_a = torch.tensor([0.5, -math.inf, -math.inf], requires_grad=True)
    lse_b = torch.tensor([-math.inf, 1.0, -math.inf], requires_grad=True)
    out_a, out_b = torch.ones(3, 2, requires_grad=True), torch.full((3, 2), 2.0, requires_grad=True)
    merged, merged_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    (merged.sum() + merged_lse[:2].sum()).backward()
    for grad in (lse_a.grad, lse_b.grad, out_a.grad, out_b.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert lse_a.grad[2] == lse_b.grad[2] == 0 and not out_a.grad[2].any() and not out_b.grad[2].any()
    torch.testing.assert_close(out_a.grad[0], torch.ones(2))  # a row that takes one side passes its gradient


def _reference_lse(q, k, *, scale, allowed=None, score_mod=None):
    """Each row's log-sum-exp of its final scores in float64 (-inf for a row with no key)."""
    scores = q @ k.transpose(-2, -1) * scale
    if score_mod is not None:
        h = torch.arange(scores.shape[-3]).view(-1, 1, 1)
        scores = score_mod(
            scores, torch.tensor(0), h, torch.arange(q.shape[-2]).unsqueeze(-1), torch.arange(k.shape[-2])
        )
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("option", ["mask", "causal", "score_mod"])
def test_the_backend_function_passes_every_option_to_the_kernels(option, monkeypatch):
    """``tiled.attention`` (the registry's function) with scale 0.3 and one option: values, gradients and the
    log-sum-exp of ``attention_with_lse`` equal the reference; the module's tile sizes are used."""
    monkeypatch.setattr(tiled, "BLOCK_Q", 4)
    monkeypatch.setattr(tiled, "BLOCK_K", 3)
    q, k, v = inputs(2, 9, 5, keys=13, seed=5)
    grad = torch.randn(2, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    window = masks.sliding_window(4)
    kwargs, allowed, score_mod = {
        "mask": ({"mask": window}, window.materialize(1, 1, 9, 13)[0, 0], None),
        "causal": ({"causal": True}, torch.ones(9, 13, dtype=torch.bool).tril(4), None),
        "score_mod": ({"score_mod": alibi}, None, alibi),
    }[option]
    options = {"mask": None, "causal": False, "scale": 0.3} | kwargs

    def backend(q, k, v):
        out, weights = tiled.attention(q, k, v, dropout_p=0.0, return_weights=False, **options)
        assert weights is None
        return out

    got = grads_of(backend, q, k, v, grad)
    want = grads_of(lambda q, k, v: reference(q, k, v, scale=0.3, allowed=allowed, score_mod=score_mod), q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    _, lse = tiled.attention_with_lse(q, k, v, **options)
    torch.testing.assert_close(lse, _reference_lse(q, k, scale=0.3, allowed=allowed, score_mod=score_mod))


@pytest.mark.parametrize(("dropout_p", "return_weights"), [(0.1, False), (0.0, True)])
def test_the_backend_function_refuses_dropout_and_weights(dropout_p, return_weights):
    """Called directly (``attention`` checks first), the backend fails rather than ignore either."""
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(AssertionError, match=r"^checked by choose_backend$"):
        tiled.attention(q, q, q, mask=None, causal=False, scale=0.5, dropout_p=dropout_p, return_weights=return_weights)


def test_query_chunks_with_offsets_equal_the_whole():
    """Queries split in two chunks at global offsets 0 and 5 (a description is evaluated at global
    positions): each chunk's rows, log-sum-exps and dq are the whole call's; dk and dv add up."""
    q, k, v = inputs(2, 12, 4, keys=12, seed=7)
    grad = torch.randn(2, 12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    out, lse = tiled_forward(q, k, v, scale=0.5, causal=True, block_q=5, block_k=5)
    dq, dk, dv = tiled_backward(q, k, v, out, lse, grad, scale=0.5, causal=True)
    dk_sum, dv_sum = torch.zeros_like(dk), torch.zeros_like(dv)
    for start, stop in ((0, 5), (5, 12)):
        rows = slice(start, stop)
        options = {"scale": 0.5, "mask": masks.causal(), "q_offset": start, "total": (12, 12), "block_k": 4}
        out_c, lse_c = tiled_forward(q[:, rows], k, v, block_q=3, **options)
        torch.testing.assert_close(out_c, out[:, rows])
        torch.testing.assert_close(lse_c, lse[:, rows])
        dq_c, dk_c, dv_c = tiled_backward(q[:, rows], k, v, out_c, lse_c, grad[:, rows], block_q=2, **options)
        torch.testing.assert_close(dq_c, dq[:, rows])
        dk_sum, dv_sum = dk_sum + dk_c, dv_sum + dv_c
    torch.testing.assert_close(dk_sum, dk)
    torch.testing.assert_close(dv_sum, dv)


@pytest.mark.parametrize(("q_lead", "kv_lead"), [((2, 3), (1, 3)), ((1, 3), (2, 3)), ((2, 3), (3,))])
def test_leading_dimensions_of_queries_and_keys_broadcast(q_lead, kv_lead):
    """Queries and keys/values whose leading dimensions differ but broadcast (one key set for every batch
    row, or one query set against several): output over the broadcast shape, gradients summed back."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(*q_lead, 7, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(*kv_lead, 10, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(*kv_lead, 10, 5, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 3, 7, 5, generator=gen, dtype=torch.float64)
    allowed = torch.ones(7, 10, dtype=torch.bool).tril(3)
    want = grads_of(lambda q, k, v: reference(q, k, v, scale=0.5, allowed=allowed), q, k, v, grad)
    options = {"scale": 0.5, "causal": True, "block_q": 3, "block_k": 4}
    out, lse = tiled_forward(q, k, v, **options)
    got = (out, *tiled_backward(q, k, v, out, lse, grad, **options))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_the_kernels_keep_their_tensors_on_the_inputs_device():
    """On the meta device (shapes, no data) every tensor the kernels make stays there; one made on the CPU
    would fail to take a meta tile or come back on the wrong device."""
    meta = torch.device("meta")
    q, k = torch.empty(2, 9, 4, device=meta), torch.empty(2, 13, 4, device=meta)
    v = torch.empty(2, 13, 5, device=meta)
    options = {"scale": 0.5, "mask": masks.sliding_window(5), "block_q": 4, "block_k": 3}
    out, lse = tiled_forward(q, k, v, **options)
    assert (out.device, out.shape, lse.device, lse.shape) == (meta, (2, 9, 5), meta, (2, 9))
    grads = tiled_backward(q, k, v, out, lse, torch.empty_like(out), **options)
    assert [(g.device, g.shape) for g in grads] == [(meta, x.shape) for x in (q, k, v)]


def test_bfloat16_inputs_are_computed_in_float32_and_rounded_once():
    """The kernels on bfloat16 inputs give exactly the float32 results of the same values, rounded to
    bfloat16 (lse stays float32): every step is done in float32."""
    q, k, v = (x.bfloat16() for x in inputs(2, 9, 5, keys=13, seed=10))
    grad = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(11)).bfloat16()
    options = {"scale": 0.3, "causal": True, "block_q": 4, "block_k": 3}
    out, lse = tiled_forward(q, k, v, **options)
    out32, lse32 = tiled_forward(q.float(), k.float(), v.float(), **options)
    assert (out.dtype, lse.dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(out, out32.bfloat16()) and torch.equal(lse, lse32)
    grads = tiled_backward(q, k, v, out, lse, grad, **options)
    grads32 = tiled_backward(q.float(), k.float(), v.float(), out.float(), lse, grad.float(), **options)
    for g, g32 in zip(grads, grads32, strict=True):
        assert g.dtype == torch.bfloat16 and torch.equal(g, g32.bfloat16())


def test_results_do_not_depend_on_torchs_default_dtype():
    """float32 inputs give the same bits whether torch's default dtype is float32 or float64: every
    tensor the kernels make has an explicit dtype."""
    q, k, v = (x.float() for x in inputs(2, 9, 5, keys=13, seed=12))
    grad = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(13))
    options = {"scale": 0.3, "mask": masks.sliding_window(6), "block_q": 4, "block_k": 3}

    def run():
        out, lse = tiled_forward(q, k, v, **options)
        return (out, lse, *tiled_backward(q, k, v, out, lse, grad, **options))

    want = run()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run()
    finally:
        torch.set_default_dtype(default)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_each_row_is_shifted_by_its_own_maximum():
    """Row 0's largest score is over 800 above the other rows': shifting every row by the largest score of
    all would turn the other rows' exp to 0 (float64 underflows below exp(-745))."""
    q, k, v = inputs(2, 6, 4, keys=7, seed=14)
    q[:, 0] *= 1000
    out, lse = tiled_forward(q, k, v, scale=0.5, block_q=4, block_k=3)
    torch.testing.assert_close(out, reference(q, k, v, scale=0.5))
    torch.testing.assert_close(lse, _reference_lse(q, k, scale=0.5))
    assert float(lse[:, 0].max() - lse[:, 1:].max()) > 800  # the premise


def test_merge_partials_keeps_the_dtypes_of_out_and_lse():
    """bfloat16 outputs with float32 log-sum-exps (as the fused kernel gives them): merged in float32,
    returned as bfloat16 and float32."""
    gen = torch.Generator().manual_seed(15)
    out_a, out_b = (torch.randn(3, 4, generator=gen).bfloat16() for _ in range(2))
    lse_a, lse_b = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    merged, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert (merged.dtype, lse.dtype) == (torch.bfloat16, torch.float32)
    want_lse = torch.logaddexp(lse_a.double(), lse_b.double())
    want = (lse_a.double() - want_lse).exp()[:, None] * out_a.double()
    want = want + (lse_b.double() - want_lse).exp()[:, None] * out_b.double()
    torch.testing.assert_close(merged, want.bfloat16())
    torch.testing.assert_close(lse, want_lse.float())


def test_tile_sizes_halve_the_larger_side_until_every_head_fits_the_limit():
    # dense: 2048 x 1024 for one head, then within TILE_LIMIT = 2^21 scores over every head, down to 256 x 512
    assert [tiled.tile_sizes(h) for h in (1, 2, 4, 8, 16, 1000)] == [
        (2048, 1024), (1024, 1024), (512, 1024), (512, 512), (256, 512), (256, 512)
    ]  # fmt: skip
    assert [tiled.tile_sizes(h, causal=True) for h in (1, 8, 16)] == [(512, 512), (512, 512), (256, 512)]
    assert [tiled.tile_sizes(h, sparse=True) for h in (1, 64)] == [(256, 512), (256, 512)]
    for heads in (1, 3, 4, 8, 16):
        block_q, block_k = tiled.tile_sizes(heads)
        assert block_q * block_k * heads <= tiled.TILE_LIMIT
        assert type(block_q) is int and type(block_k) is int  # they are range() steps


def test_every_tile_of_one_shape_writes_its_products_into_one_reused_buffer(monkeypatch):
    buffers = []
    real_call = tiled._Scratch.__call__

    def spy(self, name, rows, cols):
        buffer = real_call(self, name, rows, cols)
        buffers.append((name, rows, cols, buffer.data_ptr()))
        return buffer

    monkeypatch.setattr(tiled._Scratch, "__call__", spy)
    q, k, v = inputs(2, 12, 4, keys=10, seed=13)
    options = {"scale": 0.5, "block_q": 4, "block_k": 4}  # 3 x 3 tiles, the last key block 2 wide
    out, lse = tiled_forward(q, k, v, **options)
    assert [b[:3] for b in buffers] == [("scores", 4, 4), ("scores", 4, 4), ("scores", 4, 2)] * 3
    forward = buffers[:]
    buffers.clear()
    tiled_backward(q, k, v, out, lse, torch.ones_like(out), **options)
    assert sorted({b[:3] for b in buffers}) == [("dP", 4, 2), ("dP", 4, 4), ("scores", 4, 2), ("scores", 4, 4)]
    for calls in (forward, buffers):  # one buffer per name and shape, and the two names never share memory
        places = {b[:3]: set() for b in calls}
        for name, rows, cols, pointer in calls:
            places[name, rows, cols].add(pointer)
        assert all(len(pointers) == 1 for pointers in places.values())
        assert len({pointer for pointers in places.values() for pointer in pointers}) == len(places)


@pytest.mark.parametrize("lead", [(1, 1), (2, 3)], ids=["one head", "2 x 3 heads"])
@pytest.mark.parametrize("kind", ["dense", "causal", "description"])
def test_the_backend_function_takes_the_tile_sizes_of_its_heads_and_mask(kind, lead, monkeypatch):
    seen = {}

    def spy(q, k, v, *, forward, backward, options):
        seen.update(options)
        return tiled_forward(q, k, v, **options)

    monkeypatch.setattr(tiled, "recompute_attention", spy)
    q = torch.randn(*lead, 8, 4)  # with one head the three kinds get three different sizes
    mask = masks.sliding_window(3) if kind == "description" else None
    tiled.attention_with_lse(q, q, q, mask=mask, causal=kind == "causal", scale=0.5)
    expected = tiled.tile_sizes(math.prod(lead), sparse=kind == "description", causal=kind == "causal")
    assert (seen["block_q"], seen["block_k"]) == expected


def test_a_score_mod_may_return_a_table_that_only_broadcasts_to_the_tile():
    q, k, v = inputs(2, 6, 4, keys=6, seed=7)
    table = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    def bias_only(score, b, h, q_idx, kv_idx):
        return table[q_idx, kv_idx]  # (bq, bk): the scores are ignored

    out, lse = tiled_forward(q, k, v, scale=0.5, score_mod=bias_only, block_q=4, block_k=4)
    torch.testing.assert_close(out, torch.softmax(table, dim=-1).expand(2, 6, 6) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(table, dim=-1).expand(2, 6))


def test_a_second_derivative_is_refused_not_computed_wrong():
    q, k, v = (x.requires_grad_() for x in inputs(2, 6, 4, keys=6, seed=9))
    out = tiled.attention(q, k, v, mask=None, causal=True, scale=0.5, dropout_p=0.0, return_weights=False)[0]
    (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_q.sum().backward()
