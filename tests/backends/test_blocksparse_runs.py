"""The block-sparse backend where it splits a query block into several fused runs, and every backend's scale.

A span of neighbouring non-empty key blocks is one fused call unless its mask would exceed ``MASK_LIMIT``
elements; then it is split where FULL and PARTIAL blocks alternate, and a PARTIAL run that starts after
key 0 can hold rows with no allowed key (whose log-sum-exp the kernel reports as 0). These tests run that
path with the default tiles and with small tiles and a small limit, in float64 against the float64
reference: a row that loses its keys' weight to a wrong log-sum-exp of 0 is off by ``exp(-lse)`` relative,
about 1e-3 with a thousand keys, far beyond float64 rounding but within reach of float32's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from conftest import reference_attention
from selfattention import BACKENDS, attention, masks
from selfattention.backends import blocksparse, flex
from selfattention.backends.tiles import Tiles
from selfattention.functional import materialize_mask


def _inputs(b: int, h: int, t: int, s: int, d: int, e: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, s, e, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, h, t, e, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def _against_reference(q, k, v, grad, *, backend: str, mask=None, causal=False, scale=None) -> None:
    """Output and gradients of ``backend`` against the float64 reference (float64 tolerances: 1e-7)."""
    out = attention(q, k, v, mask=mask, causal=causal, scale=scale, backend=backend)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    if isinstance(mask, masks.MaskDescription):
        mask = materialize_mask(mask, q, k.shape[-2])
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, mask=mask, causal=causal, scale=scale)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad.double()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, b, msg=lambda m, name=name: f"{backend} {name}: {m}")


def _split(t: int, s: int, *, causal: bool, mask=None) -> tuple[int, int]:
    """The premise of a test: how many query blocks the block-sparse forward splits into several runs, and
    how many rows have no allowed key in one of those runs (while having keys in another)."""
    q, k = torch.empty(1, 1, t, 1), torch.empty(1, 1, s, 1)
    tiles = Tiles(q, k, mask=mask, causal=causal, block_q=blocksparse.BLOCK, block_k=blocksparse.BLOCK)
    blocks = rows = 0
    for i, q0, q1 in tiles.query_blocks():
        runs = blocksparse._runs(tiles, i, (q0, q1), q.dtype)
        if len(runs) > 1:
            blocks += 1
            rows += sum(int((~run.row_ok).sum()) for run in runs if run.row_ok is not None)
    return blocks, rows


@pytest.mark.parametrize("backend", ["blocksparse", "auto"])
def test_causal_t_not_s_with_default_tiles_splits_runs_and_equals_the_reference(backend: str) -> None:
    """T=1045, S=1300: the last query blocks span 1280+ keys (> MASK_LIMIT / 256), so FULL and PARTIAL runs
    are separate, and in the PARTIAL run starting at key 1024 the first row of block 768 sees no key."""
    assert _split(1045, 1300, causal=True) == (1, 1)
    _against_reference(*_inputs(1, 2, 1045, 1300, 8, 8, seed=0), backend=backend, causal=True)


@pytest.fixture
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 16 and runs of at most 16 x 32 mask elements: any span of three blocks or more is split."""
    monkeypatch.setattr(blocksparse, "BLOCK", 16)
    monkeypatch.setattr(blocksparse, "MASK_LIMIT", 16 * 32)


SMALL_CASES = {  # name -> (T, S, causal, mask); S - T = 47 puts a run boundary right after a row's last key
    "causal T < S": (45, 92, True, None),
    "causal T > S": (100, 45, True, None),
    "causal T = S": (70, 70, True, None),
    "window": (45, 92, False, masks.sliding_window(60)),
    "documents & causal": (45, 92, True, masks.documents(torch.arange(92).unsqueeze(0) // 40)),
    "padding & causal": (45, 92, True, masks.padding([87])),
    "prefix": (60, 60, False, masks.prefix_lm(25)),
}


@pytest.mark.parametrize("case", list(SMALL_CASES))
@pytest.mark.parametrize("as_tensor", [False, True])
def test_split_runs_with_small_tiles_equal_the_reference(small_runs: None, case: str, as_tensor: bool) -> None:
    """Descriptions split their spans; the same masks as tensors make every tile PARTIAL (one run per span)."""
    t, s, causal, mask = SMALL_CASES[case]
    q, k, v, grad = _inputs(1, 2, t, s, 8, 6, seed=1)
    blocks, rows = _split(t, s, causal=causal, mask=mask)
    assert blocks >= 1 and (rows >= 1 or t >= s)
    if as_tensor and mask is not None:
        mask = materialize_mask(mask, q, s)
    _against_reference(q, k, v, grad, backend="blocksparse", mask=mask, causal=causal)


CALLS = {  # name -> (T, S, causal, mask): each backend's main paths, and "auto"'s picks
    "dense": (20, 30, False, None),
    "causal T = S": (30, 30, True, None),
    "causal T != S": (20, 300, True, None),  # auto: blocksparse
    "tensor mask": (20, 30, False, "tensor"),
    "description": (520, 520, False, masks.sliding_window(40)),  # auto: blocksparse (T·S > 512²)
}


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("call", list(CALLS))
def test_every_backend_uses_a_custom_scale(backend: str, call: str) -> None:
    """scale=0.3 with D=16 (the default would be 0.25): a fused call that drops ``scale=`` is off by ~0.1."""
    t, s, causal, mask = CALLS[call]
    if backend == "loop" and t * s > 20 * 30:
        t, s = 9, 13 if t != s else 9
    q, k, v, grad = _inputs(1, 2, t, s, 16, 16, seed=4)
    if mask == "tensor":
        mask = torch.rand(t, s, generator=torch.Generator().manual_seed(5)) < 0.7
    _against_reference(q, k, v, grad, backend=backend, mask=mask, causal=causal, scale=0.3)


def _record_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, str]]:
    """Every fused call planned from now on, as ``(q0, k0, k1, mask)``, mask: "none", "causal" or "tensor"."""
    calls: list[tuple[int, int, int, str]] = []
    plan = blocksparse._runs

    def recording(tiles: Tiles, i: int, rows: tuple[int, int], dtype: torch.dtype, **kwargs) -> list:
        runs = plan(tiles, i, rows, dtype, **kwargs)
        for run in runs:
            mask = "causal" if run.is_causal else "none" if run.mask is None else "tensor"
            calls.append((rows[0], run.k0, run.k1, mask))
        return runs

    monkeypatch.setattr(blocksparse, "_runs", recording)
    return calls


PLANS = {  # name -> (causal, mask ids or None, the fused calls of a forward pass with T = S = 64)
    # the diagonal tile of a plain causal call is the kernel's causal mode; a span of 16 x 32 is one call
    "causal": (True, None, [(0, 0, 16, "causal"), (16, 0, 32, "tensor"), (32, 0, 32, "none"),
                            (32, 32, 48, "causal"), (48, 0, 48, "none"), (48, 48, 64, "causal")]),
    # spans that start after key 0: one call for 16 x 32 (blocks 1 and 2), split beyond
    "documents & causal": (True, [0] * 16 + [1] * 48, [(0, 0, 16, "tensor"), (16, 16, 32, "tensor"),
                           (32, 16, 48, "tensor"), (48, 16, 48, "none"), (48, 48, 64, "tensor")]),
    # two FULL blocks with an EMPTY one between them: two calls, neither over the empty block
    "alternating documents": (False, [0] * 16 + [1] * 16 + [0] * 16 + [1] * 16, [
        (0, 0, 16, "none"), (0, 32, 48, "none"), (16, 16, 32, "none"), (16, 48, 64, "none"),
        (32, 0, 16, "none"), (32, 32, 48, "none"), (48, 16, 32, "none"), (48, 48, 64, "none")]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PLANS))
def test_fused_calls_are_the_runs_the_module_promises(small_runs: None, monkeypatch, name: str) -> None:
    """Neighbouring non-empty blocks are one call (FULL ones without a mask, a diagonal one in the kernel's
    causal mode) unless the mask would exceed MASK_LIMIT, and no call spans an EMPTY block; the result is
    the reference's."""
    causal, ids, plan = PLANS[name]
    mask = None if ids is None else masks.documents(ids) & masks.causal() if causal else masks.documents(ids)
    causal = causal and mask is None
    q, k, v, grad = _inputs(1, 2, 64, 64, 8, 8, seed=6)
    calls = _record_runs(monkeypatch)
    attention(q.detach(), k.detach(), v.detach(), mask=mask, causal=causal, backend="blocksparse")
    assert calls == plan
    _against_reference(q, k, v, grad, backend="blocksparse", mask=mask, causal=causal)


def test_the_block_argument_sets_the_tile_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """``block=16`` cuts 64 queries into four blocks (the default 256 would make one call)."""
    q, k, v, _ = _inputs(1, 2, 64, 64, 8, 8, seed=7)
    calls = _record_runs(monkeypatch)
    options = {"mask": None, "causal": True, "scale": 0.3, "dropout_p": 0.0, "return_weights": False}
    out, _ = blocksparse.attention(q.detach(), k.detach(), v.detach(), **options, block=16)
    assert calls == [(0, 0, 16, "causal"), (16, 0, 32, "tensor"), (32, 0, 48, "tensor"), (48, 0, 64, "tensor")]
    assert_close(out, reference_attention(q, k, v, causal=True, scale=0.3)[0])


def _reference_lse(q, k, *, scale: float, allowed=None, bias=None, causal=False) -> torch.Tensor:
    """Each row's log-sum-exp of its allowed scaled scores in float64 (-inf for a row with no key)."""
    scores = q.double() @ k.double().transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool).tril(s - t), -math.inf)
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("case", ["boolean mask", "float mask", "causal T > S"])
def test_lse_is_the_row_log_sum_exp_and_minus_inf_for_rows_with_no_key(case: str) -> None:
    """The log-sum-exp the backend returns (recorded by ``capture``): the fused kernel reports 0 for a row
    whose keys are all masked, which must become -inf; a query block with no key at all keeps -inf."""
    gen = torch.Generator().manual_seed(8)
    t, s = (40, 10) if case == "causal T > S" else (6, 9)
    q, k, v, _ = _inputs(1, 2, t, s, 8, 8, seed=9)
    allowed = torch.rand(t, s, generator=gen) < 0.6
    allowed[2] = False
    bias = torch.where(allowed, torch.randn(t, s, generator=gen, dtype=torch.float64), -math.inf)
    mask, causal, want = {
        "boolean mask": (allowed, False, _reference_lse(q, k, scale=0.3, allowed=allowed)),
        "float mask": (bias, False, _reference_lse(q, k, scale=0.3, bias=bias)),
        "causal T > S": (None, True, _reference_lse(q, k, scale=0.3, causal=True)),
    }[case]
    out, lse = blocksparse.attention_with_lse(q, k, v, mask=mask, causal=causal, scale=0.3, block=16)
    assert bool(torch.isneginf(want).any())  # the premise: some rows have no key
    assert_close(lse, want)
    assert_close(out, reference_attention(q, k, v, mask=mask, causal=causal, scale=0.3)[0])


def test_the_kernels_keep_their_tensors_on_the_inputs_device() -> None:
    """On the meta device (shapes, no data) every tensor the kernels make stays there, values and grads;
    one made on the CPU would fail to take a meta tile or come back on the wrong device."""
    meta = torch.device("meta")
    q = torch.empty(1, 2, 40, 8, device=meta, requires_grad=True)
    k = torch.empty(1, 2, 56, 8, device=meta, requires_grad=True)
    v = torch.empty(1, 2, 56, 6, device=meta, requires_grad=True)
    for mask, causal in ((None, True), (masks.sliding_window(20), False)):
        out, lse = blocksparse.attention_with_lse(q, k, v, mask=mask, causal=causal, scale=0.3, block=16)
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
        assert (out.device, lse.device) == (meta, meta)
        assert (out.shape, lse.shape, lse.dtype) == ((1, 2, 40, 6), (1, 2, 40), torch.float32)
        assert [(g.device, g.shape) for g in grads] == [(meta, x.shape) for x in (q, k, v)]


def test_float64_inputs_keep_float64_precision() -> None:
    """Values and gradients agree with the float64 reference to 1e-10: a float32 accumulator anywhere
    would be off by about 1e-7 (float64's own rounding here is below 1e-13)."""
    q, k, v, grad = _inputs(1, 2, 45, 92, 8, 8, seed=10)
    out = blocksparse.attention_with_lse(q, k, v, mask=masks.sliding_window(60), causal=False, scale=0.3,
                                         block=16)[0]  # fmt: skip
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    allowed = masks.sliding_window(60).materialize(1, 1, 45, 92)
    q64, k64, v64 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, mask=allowed, scale=0.3)[0]
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_backward_returns_the_inputs_dtypes_from_a_float32_gradient() -> None:
    """``blocksparse_backward`` called directly with bfloat16 inputs and a float32 ``grad_out`` gives
    bfloat16 gradients, equal to those of the same inputs in float32 up to bfloat16's rounding."""
    q, k, v, grad = (x.detach().float() for x in _inputs(1, 2, 40, 56, 8, 8, seed=11))
    options = {"scale": 0.3, "mask": None, "causal": True, "block": 16}
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        inputs = [x.to(dtype) for x in (q, k, v)]
        out, lse = blocksparse.blocksparse_forward(*inputs, **options)
        results[dtype] = blocksparse.blocksparse_backward(*inputs, out, lse, grad, **options)
    assert [g.dtype for g in results[torch.bfloat16]] == [torch.bfloat16] * 3
    for low, high in zip(results[torch.bfloat16], results[torch.float32], strict=True):
        assert_close(low.float(), high, rtol=2**-6, atol=2**-6)


def test_off_the_cpu_the_backend_is_flexattention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs on another device go to ``flex.attention`` with every argument as given."""
    seen = []

    def flex_attention(*args, **kwargs):
        seen.append((args, kwargs))
        return "flex", None

    monkeypatch.setattr(flex, "attention", flex_attention)
    q, k, v = (torch.empty(1, 2, 5, 4, device="meta") for _ in range(3))
    rule = masks.sliding_window(3)
    result = blocksparse.attention(q, k, v, mask=rule, causal=True, scale=0.3, dropout_p=0.0, return_weights=False)
    assert result == ("flex", None)
    ((args, kwargs),) = seen
    assert all(a is b for a, b in zip(args, (q, k, v), strict=True))
    assert kwargs == {"mask": rule, "causal": True, "scale": 0.3, "dropout_p": 0.0, "return_weights": False}


@pytest.mark.parametrize(("dropout_p", "return_weights"), [(0.1, False), (0.0, True)])
def test_the_backend_function_refuses_dropout_and_weights(dropout_p: float, return_weights: bool) -> None:
    """Called directly (``attention`` checks first), the backend fails rather than ignore either."""
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(AssertionError, match=r"^checked by choose_backend$"):
        blocksparse.attention(q, q, q, mask=None, causal=False, scale=0.5, dropout_p=dropout_p,
                              return_weights=return_weights)  # fmt: skip


def test_unequal_leading_dimensions_are_refused_with_the_shapes() -> None:
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 6)
    with pytest.raises(ValueError, match=r"query \(2, 3, 5, 4\), key \(1, 3, 5, 4\), value \(1, 3, 5, 6\)"):
        blocksparse.attention_with_lse(q, k, v, mask=None, causal=False, scale=0.5)


@pytest.mark.parametrize(("t", "s", "d", "e"), [(4, 6, 16, 8), (5, 8, 4, 16)])
def test_query_and_value_widths_may_differ_either_way(t: int, s: int, d: int, e: int) -> None:
    """The kernel takes one width: the narrower of D and E is padded with zeros, then cut off again."""
    _against_reference(*_inputs(1, 2, t, s, d, e, seed=12), backend="blocksparse", causal=True, scale=0.3)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 7, 9), (3, 1, 7, 9)])
def test_a_mask_over_several_leading_dimensions(mask_shape: tuple[int, ...]) -> None:
    """Query ``(2, 3, H, T, D)`` with a mask that differs along a leading dimension: each batch row gets its
    own mask after the leading dimensions are flattened."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 3, 2, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for n in (7, 9, 9))  # fmt: skip
    grad = torch.randn(2, 3, 2, 7, 8, generator=gen, dtype=torch.float64)
    allowed = torch.rand(mask_shape, generator=gen) < 0.7
    _against_reference(q, k, v, grad, backend="blocksparse", mask=allowed)


def test_a_bfloat16_call_split_into_runs_rounds_its_output_once(small_runs: None) -> None:
    """The runs' outputs are merged in float32 and rounded to bfloat16 once at the end.

    Keys alternate between two documents every 16 positions, so each query block is four FULL runs; ``v``
    is constant over each run's keys, so each run's output is exact and the merged output should be the
    float64 result rounded once. Merging in bfloat16 would round after every merge and miss that result
    in about a fifth of the entries; rounding once misses it only where the exact value is within float32's
    error of a rounding boundary (none here, with values in [1, 2))."""
    gen = torch.Generator().manual_seed(14)
    ids = (torch.arange(128) // 16) % 2
    q, k = (torch.randn(1, 2, 128, 8, generator=gen).bfloat16() for _ in range(2))
    per_run = 1 + torch.rand(1, 2, 8, 1, 8, generator=gen)  # in [1, 2): a weighted mean of them cannot cancel
    v = per_run.expand(1, 2, 8, 16, 8).reshape(1, 2, 128, 8).bfloat16()
    got = attention(q, k, v, mask=masks.documents(ids), backend="blocksparse")
    allowed = masks.documents(ids).materialize(1, 1, 128, 128)
    want = reference_attention(q, k, v, mask=allowed)[0].bfloat16()
    assert got.dtype == torch.bfloat16
    assert float((got != want).double().mean()) <= 0.01


def _count_fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The query shape ``(B', H, rows, D)`` of every fused forward and backward call from now on."""
    shapes: list[tuple[int, ...]] = []
    forward, backward = blocksparse._fused()

    def counted_forward(q, *args, **kwargs):
        shapes.append(tuple(q.shape))
        return forward(q, *args, **kwargs)

    def counted_backward(grad_out, q, *args, **kwargs):
        shapes.append(tuple(q.shape))
        return backward(grad_out, q, *args, **kwargs)

    monkeypatch.setattr(blocksparse, "_fused", lambda: (counted_forward, counted_backward))
    return shapes


def _holes(t: int) -> torch.Tensor:
    """A random boolean (T, T) mask in which query 5 may attend to no key."""
    allowed = torch.rand(t, t, generator=torch.Generator().manual_seed(13)) < 0.5
    allowed[5] = False
    return allowed


GROUP_CASES = {  # name -> (B, T, mask, B * blocks of each fused forward call; H = 3, tiles of 16)
    # block 0 sees keys [0, 16) in the kernel's causal mode, blocks 1..7 a window of 32 keys with one mask
    "window": (1, 128, lambda t: masks.sliding_window(17), [1, 7]),
    # documents of 24 tokens in tiles of 16: blocks at one offset from their keys with masks of their own
    # (two distinct masks among the three blocks of the first call: stacked, never one shared)
    "documents of 24": (1, 128, lambda t: masks.documents([i // 24 for i in range(t)]), [3, 2, 3]),
    # documents of 22: blocks 1 and 3 share a call, with two different masks
    "documents of 22": (1, 96, lambda t: masks.documents([i // 22 for i in range(t)]), [1, 2, 1, 1, 1]),
    # a mask tensor: every block's one run spans all 64 keys, at another offset from the block each time
    "tensor with an empty row": (1, 64, _holes, [1, 1, 1, 1]),
    # blocks 1 and 2 see the 32 keys from 16 before them, with masks that differ along the batch (stacked);
    # blocks 0 and 3 see 16 keys at other offsets (block 3's own keys are padding in both rows of the
    # batch), and in block 3 the second row's queries see no key
    "padding & window": (2, 64, lambda t: masks.sliding_window(9) & masks.padding([40, 23]), [2, 4, 2]),
    # the same with equal rows of the batch: each block's mask has a batch dimension of 2 all the same
    "equal padding & window": (2, 64, lambda t: masks.sliding_window(9) & masks.padding([40, 40]), [2, 4, 2]),
    # block 0's one run is a FULL tile of 16 keys, block 1's a PARTIAL one of the same size (two documents
    # in it): a mask and no mask are never one call
    "full and partial of one size": (1, 32, lambda t: masks.documents([0] * 16 + [1] * 8 + [2] * 8), [1, 1]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_query_blocks_whose_runs_have_one_shape_share_fused_calls(monkeypatch, name: str) -> None:
    """A sliding window's blocks past the first all see a window of keys of one shape at one offset: one
    fused call takes them together (what makes the backend fast on long windows); values and gradients are
    the reference's, with masks shared or stacked per row of the batch."""
    batch, t, make_mask, calls = GROUP_CASES[name]
    mask = make_mask(t)
    monkeypatch.setattr(blocksparse, "BLOCK", 16)
    monkeypatch.setattr(blocksparse, "block_size", lambda mask: 16)  # tiles of 16 for the window of 9 too
    q, k, v, grad = _inputs(batch, 3, t, t, 8, 8, seed=11)
    shapes = _count_fused_calls(monkeypatch)
    attention(q.detach(), k.detach(), v.detach(), mask=mask, backend="blocksparse")
    assert shapes == [(rows, 3, 16, 8) for rows in calls]
    _against_reference(q, k, v, grad, backend="blocksparse", mask=mask)


LIMIT_CASES = {  # (T, S, GROUP_LIMIT) -> B * blocks of each fused forward call, tiles of 16, window of 17
    # each block of the group sees the 32 keys from 16 before it: 1024 scores with 2 heads
    (128, 128, 3000): [1, 2, 2, 2, 1],  # block 0 alone (keys from 0), blocks 1..7 two at a time
    (128, 128, 1): [1] * 8,  # a limit below one block's scores: one by one
    (64, 128, 3000): [2, 2],  # 64 cached keys: block 0 too starts 16 keys before itself
}


@pytest.mark.parametrize(("t", "s", "limit"), list(LIMIT_CASES))
def test_a_group_is_cut_where_its_scores_pass_the_limit(monkeypatch, t: int, s: int, limit: int) -> None:
    """GROUP_LIMIT bounds the scores (and so the stacked masks) of one call."""
    monkeypatch.setattr(blocksparse, "BLOCK", 16)
    monkeypatch.setattr(blocksparse, "GROUP_LIMIT", limit)
    q, k, v, grad = _inputs(1, 2, t, s, 8, 8, seed=12)
    shapes = _count_fused_calls(monkeypatch)
    mask = masks.sliding_window(17)
    attention(q.detach(), k.detach(), v.detach(), mask=mask, backend="blocksparse")
    assert shapes == [(rows, 2, 16, 8) for rows in LIMIT_CASES[t, s, limit]]
    _against_reference(q, k, v, grad, backend="blocksparse", mask=mask)


def test_a_window_s_group_reads_the_inputs_in_place_and_makes_each_mask_once(monkeypatch) -> None:
    """What makes a long window fast: the group's queries, keys and values handed to the fused kernel are
    views of the inputs (no copies), and a shift-invariant mask is built once per offset, not per block."""
    monkeypatch.setattr(blocksparse, "BLOCK", 16)
    q, k, v, _ = _inputs(1, 2, 128, 128, 8, 8, seed=16)
    q, k, v = (x.detach() for x in (q, k, v))
    storages: list[tuple[bool, ...]] = []
    forward, backward = blocksparse._fused()

    def recording(query, key, value, *args, **kwargs):
        storages.append(tuple(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                              for a, b in ((query, q), (key, k), (value, v))))  # fmt: skip
        return forward(query, key, value, *args, **kwargs)

    built: list[tuple[tuple[int, int], tuple[int, int]]] = []
    tile_mask = Tiles.tile_mask

    def counted(self, rows, cols):
        built.append((rows, cols))
        return tile_mask(self, rows, cols)

    monkeypatch.setattr(blocksparse, "_fused", lambda: (recording, backward))
    monkeypatch.setattr(Tiles, "tile_mask", counted)
    attention(q, k, v, mask=masks.sliding_window(17), backend="blocksparse")
    assert storages == [(True, True, True)] * 2  # block 0, then blocks 1..7
    assert built == [((0, 16), (0, 16)), ((16, 32), (0, 32))]  # block 0's mask, and one for blocks 1..7
    built.clear()
    attention(q, k, v, mask=masks.documents([i // 24 for i in range(128)]), backend="blocksparse")
    assert len(built) == 8  # not shift-invariant: every block's mask is made
    built.clear()  # spans split into FULL and PARTIAL runs (above MASK_LIMIT): still one mask per offset
    monkeypatch.setattr(blocksparse, "MASK_LIMIT", 16 * 32)
    attention(q, k, v, mask=masks.sliding_window(40), backend="blocksparse")
    made = [(cols[0] - rows[0], rows[1] - rows[0], cols[1] - cols[0]) for rows, cols in built]
    assert len(built) > 2 and len(made) == len(set(made))


@pytest.mark.parametrize("t", [120, 128])
def test_a_window_over_strided_inputs_equals_the_reference(monkeypatch, t: int) -> None:
    """The group's queries, keys and values are strided views of the inputs: inputs laid out (B, T, H, D)
    and transposed, and a last block shorter than the others (T = 120: 8 rows), with a window that starts
    before the queries (S = T + 24)."""
    monkeypatch.setattr(blocksparse, "BLOCK", 16)
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, n, 2, 8, generator=gen, dtype=torch.float64) for n in (t, t + 24, t + 24))
    q, k, v = (x.transpose(1, 2).requires_grad_() for x in (q, k, v))  # (B, H, T, D), not contiguous
    grad = torch.randn(1, 2, t, 8, generator=gen, dtype=torch.float64)
    _against_reference(q, k, v, grad, backend="blocksparse", mask=masks.sliding_window(21))


@pytest.mark.parametrize("mask", [masks.sliding_window(40), masks.documents(torch.arange(256) // 64)], ids=str)
def test_the_runs_are_planned_once_for_both_passes_and_the_gradients_match(mask, monkeypatch):
    made = []
    real_plan = blocksparse.plan

    def counted(*args, **kwargs):
        made.append(1)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(blocksparse, "plan", counted)
    monkeypatch.setattr(blocksparse, "BLOCK", 32)
    _against_reference(*_inputs(1, 2, 256, 256, 8, 8, seed=11), backend="blocksparse", mask=mask)
    assert len(made) == 1  # the backward pass took the forward's plan


@pytest.mark.parametrize(
    ("mask", "causal"), [(masks.sliding_window(40), False), (None, True)], ids=["window", "causal"]
)
def test_the_kernels_called_without_a_plan_make_the_same_one(mask, causal):
    q, k, v, grad = (x.detach() for x in _inputs(1, 2, 200, 200, 8, 8, seed=14))
    options = {"scale": 0.5, "mask": mask, "causal": causal, "block": 32}
    given = blocksparse.plan(q, k, mask=mask, causal=causal, block=32)
    out, lse = blocksparse.blocksparse_forward(q, k, v, **options)
    out_given, lse_given = blocksparse.blocksparse_forward(q, k, v, **options, groups=given)
    assert torch.equal(out, out_given) and torch.equal(lse, lse_given)
    grads = blocksparse.blocksparse_backward(q, k, v, out, lse, grad, **options)
    grads_given = blocksparse.blocksparse_backward(q, k, v, out, lse, grad, **options, groups=given)
    for a, b in zip(grads, grads_given, strict=True):
        assert torch.equal(a, b)


def test_split_runs_with_a_batch_of_two_equal_the_reference(small_runs: None) -> None:
    """With B = 2 the query blocks of a group are no single view: the gradients of each block's several runs
    (a window of 40 over tiles of 16 splits into FULL and PARTIAL runs) are added row by row; overwriting
    them would keep only the last run's."""
    assert _split(160, 160, causal=False, mask=masks.sliding_window(40))[0] >= 1
    _against_reference(*_inputs(2, 2, 160, 160, 8, 6, seed=16), backend="blocksparse", mask=masks.sliding_window(40))


@pytest.mark.parametrize(
    ("spans", "length", "once"),
    [
        ([(256, 512), (0, 256)], 512, True),  # any order
        ([(0, 256), (128, 512)], 512, False),  # overlapping (a window's keys)
        ([(0, 256), (256, 384)], 512, False),  # rows 384.. have no run
        ([(0, 256), (0, 256)], 512, False),  # the same rows twice, as long as the whole in all
    ],
)
def test_tiles_once_is_an_exact_cover(spans: list[tuple[int, int]], length: int, once: bool) -> None:
    assert blocksparse._tiles_once(spans, length) is once


@pytest.mark.parametrize(
    ("ids", "assigned"),
    [
        ([0] * 8 + [1] * 8 + [2] * 8, [True, True, True]),  # documents aligned to the 8-token tiles
        # a tile over two documents: each query block is still one run, but keys 8..15 are in two
        ([0] * 5 + [1] * 11 + [2] * 8, [True, False, False]),
    ],
)
def test_gradients_written_once_go_into_uninitialised_memory_and_equal_the_reference(
    monkeypatch: pytest.MonkeyPatch, ids: list[int], assigned: list[bool]
) -> None:
    monkeypatch.setattr(blocksparse, "BLOCK", 8)
    kinds: list[bool] = []

    def poisoned(shape, dtype, device, assign):  # NaN where the backend takes uninitialised memory
        kinds.append(assign)
        return torch.full(shape, math.nan if assign else 0.0, dtype=dtype, device=device)

    monkeypatch.setattr(blocksparse, "_gradient_buffer", poisoned)
    monkeypatch.setattr(blocksparse, "_as_sequence", lambda *args: None)  # not the kernel's memory (below)
    q, k, v, grad = _inputs(1, 2, 24, 24, 4, 4, seed=11)
    _against_reference(q, k, v, grad, backend="blocksparse", mask=masks.documents(ids))
    assert kinds == assigned  # dq, dk, dv


def test_one_call_over_every_row_returns_the_kernels_memory_with_the_same_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Documents aligned to the tiles and B = 1: one fused call covers every query and key once, so its output
    and gradients are views of the kernel's own memory (no copy into buffers), with the bits of the path that
    copies them and the reference's values. Three heads: the head stride sits between the members'."""
    monkeypatch.setattr(blocksparse, "BLOCK", 8)
    q, k, v, grad = _inputs(1, 3, 24, 24, 4, 4, seed=12)
    mask = masks.documents([0] * 8 + [1] * 8 + [2] * 8)
    found: list[torch.Tensor | None] = []
    as_sequence = blocksparse._as_sequence
    monkeypatch.setattr(blocksparse, "_as_sequence", lambda *args: found.append(x := as_sequence(*args)) or x)

    def run() -> list[torch.Tensor]:
        out = attention(q, k, v, mask=mask, backend="blocksparse")
        return [out, *torch.autograd.grad(out, (q, k, v), grad)]

    viewed = run()
    assert len(found) == 5 and all(x is not None for x in found)  # out, lse; dq, dk, dv
    assert not viewed[1].is_contiguous()  # dq as the kernel laid it out: (B, T, H, D) memory
    monkeypatch.setattr(blocksparse, "_as_sequence", lambda *args: None)
    for mine, copied in zip(viewed, run(), strict=True):
        assert torch.equal(mine, copied)
    _against_reference(q, k, v, grad, backend="blocksparse", mask=mask)


@pytest.mark.parametrize("width", [12, 10, 4, 3])
def test_overlapping_evenly_spaced_spans_are_added_a_stretch_at_a_time(width: int) -> None:
    """A window's key spans, 4 rows apart and ``width`` long: the same sums as adding member by member."""
    gen = torch.Generator().manual_seed(3)
    spans = [(a, a + width) for a in range(0, 12, 4)]
    rows = torch.randn(3, 2, width, 5, generator=gen, dtype=torch.float64)
    got, want = torch.zeros(1, 2, 24, 5, dtype=torch.float64), torch.zeros(1, 2, 24, 5, dtype=torch.float64)
    blocksparse._add(got, spans, rows)
    for member, (a, b) in enumerate(spans):
        want[..., a:b, :] += rows[member : member + 1]
    assert_close(got, want, atol=1e-15, rtol=0)  # the same terms in another order: float64 rounding only


def test_as_sequence_views_members_laid_out_one_after_another() -> None:
    whole = torch.randn(1, 3, 12, 2)
    members = whole.as_strided((3, 3, 4, 2), (4 * 2, 12 * 2, 2, 1))  # rows 0-3, 4-7, 8-11 of every head
    spans = [(0, 4), (4, 8), (8, 12)]
    assert torch.equal(blocksparse._as_sequence(members, spans, 12), whole)
    assert blocksparse._as_sequence(members.contiguous(), spans, 12) is None  # heads between the members
    assert blocksparse._as_sequence(members, [(4, 8), (0, 4), (8, 12)], 12) is None  # not in order
    assert blocksparse._as_sequence(members, spans, 16) is None  # rows 12-15 have no member


@pytest.mark.parametrize(
    ("mask", "block"),
    [
        (masks.sliding_window(256), 128),  # a window no wider than a tile: half tiles
        (masks.sliding_window(257), 256),
        (masks.sliding_window(100) & masks.causal(), 128),  # both must allow: the window bounds
        (masks.documents([0] * 8) & masks.sliding_window(100), 256),  # tiles aligned to documents run whole
        (masks.sliding_window(100) & masks.sliding_window(1000), 128),  # the narrower one
        (masks.sliding_window(100) | masks.sliding_window(1000), 256),  # either may allow: the wider one
        (masks.sliding_window(100) | masks.causal(), 256),  # causal reaches every key before
        (masks.documents([0] * 8), 256),
        (torch.ones(8, 8, dtype=torch.bool), 256),
        (None, 256),
    ],
)
def test_narrow_windows_get_narrower_tiles(mask, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert blocksparse.block_size(mask) == block
    seen: list[int] = []
    plan = blocksparse.plan
    monkeypatch.setattr(blocksparse, "plan", lambda *a, **kw: seen.append(kw["block"]) or plan(*a, **kw))
    q = torch.randn(1, 1, 8, 4)
    blocksparse.attention_with_lse(q, q, q, mask=mask, causal=False, scale=0.5)
    assert seen == [block]


def test_a_description_is_planned_once_per_shape_and_again_after_an_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    plan = blocksparse.plan
    monkeypatch.setattr(blocksparse, "plan", lambda q, *a, **kw: made.append(q.shape[-2]) or plan(q, *a, **kw))
    ids = torch.arange(600) // 200
    rule = masks.documents(ids)
    q = torch.randn(1, 2, 600, 8)
    first = attention(q, q, q, mask=rule, backend="blocksparse")
    assert torch.equal(attention(q, q, q, mask=rule, backend="blocksparse"), first) and made == [600]
    attention(q[..., :520, :], q[..., :520, :], q[..., :520, :], mask=masks.documents(ids[:520]), backend="blocksparse")
    assert made == [600, 520]  # another description: its own plan
    ids[:300] = 0  # documents edited in place: planned again, and the answer follows the edit
    edited = attention(q, q, q, mask=rule, backend="blocksparse")
    assert made == [600, 520, 600]
    assert_close(edited, attention(q, q, q, mask=rule.materialize(1, 2, 600, 600), backend="math"))
    rule_fn = masks.from_function(lambda b, h, qi, kv: (qi // 200) == (kv // 200))
    for _ in range(2):
        attention(q, q, q, mask=rule_fn, backend="blocksparse")
    assert made == [600, 520, 600, 600, 600]  # a function's inputs cannot be seen: never kept
