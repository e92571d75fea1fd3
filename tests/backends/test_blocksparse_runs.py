"""The block-sparse backend where it splits a query block into several fused runs, and every backend's scale.

A span of neighbouring non-empty key blocks is one fused call unless its mask would exceed ``MASK_LIMIT``
elements; then it is split where FULL and PARTIAL blocks alternate, and a PARTIAL run that starts after
key 0 can hold rows with no allowed key (whose log-sum-exp the kernel reports as 0). These tests run that
path with the default tiles and with small tiles and a small limit, in float64 against the float64
reference: a row that loses its keys' weight to a wrong log-sum-exp of 0 is off by ``exp(-lse)`` relative,
about 1e-3 with a thousand keys, far beyond float64 rounding but within reach of float32's.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import reference_attention
from selfattention import BACKENDS, attention, masks
from selfattention.backends import blocksparse
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
    "description": (300, 300, False, masks.sliding_window(40)),  # auto: blocksparse (T·S > 256²)
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
