"""Weights recomputed from a backend's log-sum-exp equal the ``"math"`` backend's weights, in bounded memory."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from selfattention import exact_weights as ew
from selfattention import masks
from selfattention.backends import BACKENDS
from selfattention.exact_weights import exact_context, exact_top_k, exact_weights
from selfattention.functional import attention

# float64 inputs: the recomputed weights and the eager ones are two roundings of the same numbers.
TOL64 = {"atol": 1e-12, "rtol": 1e-10}


def _inputs(batch=2, heads=4, kv_heads=2, queries=7, keys=9, width=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, width, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, width, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, keys, width, generator=generator, dtype=dtype)
    return q, k, v


def _bool_mask(batch, heads, queries, keys, seed=1):
    mask = torch.rand(batch, heads, queries, keys, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[0, 1, 2] = False  # a row with no key at all: zero weights, lse -inf
    return mask


def _padding(batch, keys):
    """``(B, 1, 1, S)``: the last three keys of the second row are padding."""
    return torch.arange(keys).view(1, 1, 1, keys) < torch.tensor([keys, keys - 3]).view(batch, 1, 1, 1)


CASES = {
    "none": lambda b, h, t, s: (None, False),
    "causal T<S": lambda b, h, t, s: (None, True),
    "bool mask": lambda b, h, t, s: (_bool_mask(b, h, t, s), False),
    "padding + causal": lambda b, h, t, s: (_padding(b, s), True),
    "float mask": lambda b, h, t, s: (torch.randn(1, h, t, s, dtype=torch.float64), False),
}  # fmt: skip


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_recomputed_weights_equal_the_eager_ones(backend, case, kv_heads):
    q, k, v = _inputs(kv_heads=kv_heads)
    mask, causal = CASES[case](2, 4, 7, 9)
    context, lse = attention(q, k, v, mask=mask, causal=causal, backend=backend, return_lse=True)
    ref_context, ref_weights = attention(q, k, v, mask=mask, causal=causal, backend="math", return_weights=True)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float64
    assert_close(context, ref_context, **TOL64)
    scale = 1 / math.sqrt(8)
    assert_close(exact_weights(q, k, lse, scale=scale, causal=causal, mask=mask), ref_weights, **TOL64)
    assert_close(lse, ew_reference_lse(q, k, scale, causal, mask), **TOL64)
    heads = torch.tensor([3, 0])
    recomputed = exact_context(q, k, v, lse, scale=scale, causal=causal, mask=mask, heads=heads, rows=(2, 6))
    assert_close(recomputed, ref_context[:, [3, 0], 2:6], **TOL64)


def ew_reference_lse(q, k, scale, causal, mask):
    """logsumexp of the masked, scaled scores, written out here (math backend's mask rules)."""
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = q @ k.mT * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool).tril(s - t).logical_not(), -math.inf)
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("backend", ["tiled", "blocksparse"])
@pytest.mark.parametrize("description", [masks.sliding_window(3), masks.documents([0, 0, 0, 1, 1, 1, 1, 2, 2])])
def test_mask_descriptions_are_evaluated_row_by_row(backend, description):
    q, k, v = _inputs(queries=9, keys=9)
    _, lse = attention(q, k, v, mask=description, backend=backend, return_lse=True)
    _, ref_weights = attention(q, k, v, mask=description, backend="math", return_weights=True)
    assert_close(exact_weights(q, k, lse, scale=1 / math.sqrt(8), mask=description), ref_weights, **TOL64)


def test_grouped_heads_folded_for_one_query_report_per_head_lse():
    # One query with grouped heads is computed with the query heads folded into rows: the lse must unfold.
    q, k, v = _inputs(queries=1, keys=12)
    padding = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    padding[1, ..., 9:] = False
    _, lse = attention(q, k, v, mask=padding, causal=True, return_lse=True)
    _, ref = attention(q, k, v, mask=padding, causal=True, backend="math", return_weights=True)
    assert_close(exact_weights(q, k, lse, scale=1 / math.sqrt(8), causal=True, mask=padding), ref, **TOL64)


def test_float32_within_1e6_of_the_eager_weights():
    q, k, v = _inputs(queries=64, keys=64, dtype=torch.float32)
    q = q * 3  # peaked rows, as trained models have
    _, lse = attention(q, k, v, causal=True, return_lse=True)
    _, ref = attention(q, k, v, causal=True, backend="math", return_weights=True)
    assert (exact_weights(q, k, lse, scale=1 / math.sqrt(8), causal=True) - ref).abs().max() < 1e-6


def test_selected_heads_and_rows_and_top_k():
    q, k, v = _inputs(queries=10, keys=10)
    mask = _bool_mask(2, 4, 10, 10)
    _, lse = attention(q, k, v, mask=mask, causal=True, return_lse=True)
    _, ref = attention(q, k, v, mask=mask, causal=True, backend="math", return_weights=True)
    options = {"scale": 1 / math.sqrt(8), "causal": True, "mask": mask}
    heads = torch.tensor([3, 1])
    part = exact_weights(q, k, lse, heads=heads, rows=(4, 9), **options)
    assert_close(part, ref[:, [3, 1], 4:9], **TOL64)
    values, indices, rest = exact_top_k(q, k, lse, 3, heads=heads, **options)
    top = torch.topk(ref[:, [3, 1]], 3, dim=-1)
    assert_close(values, top.values, **TOL64)
    assert_close(ref[:, [3, 1]].gather(-1, indices), values, **TOL64)  # the indices name those weights
    expected_rest = torch.where(ref[:, [3, 1]].sum(-1) > 0, 1 - top.values.sum(-1), 0.0)
    assert_close(rest, expected_rest, **TOL64)
    assert float(rest[0, 1, 2]) == 0.0  # head 1, row 2 of batch 0 has no key


def test_bad_selections_are_refused():
    q, k, _ = _inputs()
    lse = torch.zeros(2, 4, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rows \(3, 9\) out of range for 7 queries"):
        exact_weights(q, k, lse, scale=1.0, rows=(3, 9))
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 7\)"):
        exact_weights(q, k, lse[..., 1:], scale=1.0)
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        exact_top_k(q, k, lse, 0, scale=1.0)


class _Largest(TorchDispatchMode):
    """Remembers the largest tensor any operation returned."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_top_k_memory_is_bounded_by_the_chunk(monkeypatch):
    # Long enough that one head's (T, S) weights are 16x the chunk: keeping them would fail the bound.
    monkeypatch.setattr(ew, "CHUNK_ELEMENTS", 1 << 14)
    q = torch.randn(1, 2, 512, 4)
    k = torch.randn(1, 2, 512, 4)
    lse = ew_reference_lse(q.double(), k.double(), 0.5, True, None).float()
    with _Largest() as seen:
        values, _, _ = exact_top_k(q, k, lse, 4, scale=0.5, causal=True)
    assert values.shape == (1, 2, 512, 4)
    assert seen.largest <= 1 << 14 < 512 * 512


_PEAK_SCRIPT = """
import torch
from selfattention.exact_weights import exact_top_k

def resident(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024

query, key = torch.randn(1, 9, 8192, 64), torch.randn(1, 3, 8192, 64)
lse = torch.full((1, 9, 8192), 5.0)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak from here on
before = resident("VmRSS")
exact_top_k(query, key, lse, 16, scale=0.125, causal=True)
print((resident("VmHWM") - before) / 2**30)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the peak resident size from /proc")
def test_top_k_at_8192_tokens_keeps_the_process_peak_bounded():
    """The process's peak, not only the largest tensor: 9 heads, 8192 tokens, the top 16 keys, in a fresh
    process. The chunks' temporaries are 16 MiB each and the result 14 MiB; results concatenated at the end
    instead of filled in place left a small live tensor between each chunk's temporaries, and glibc grew the
    heap by about a chunk each time (1.8 GiB here)."""
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True)
    assert float(run.stdout) < 0.5, run.stdout
