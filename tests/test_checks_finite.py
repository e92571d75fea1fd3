"""checks.finite: the one-reduction fast path never hides a bad entry and never rejects a good tensor."""

from __future__ import annotations

import math

import pytest
import torch

from selfattention import checks


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_names_the_first_bad_entry(bad, dtype):
    tensor = torch.zeros(3, 4, dtype=dtype)
    tensor[1, 2] = bad
    with pytest.raises(ValueError, match=rf"x contains a non-finite value {bad} at index \(1, 2\)"):
        checks.finite("x", tensor)


def test_opposite_infinities_are_caught():
    with pytest.raises(ValueError, match=r"non-finite value inf at index \(0,\)"):
        checks.finite("x", torch.tensor([math.inf, -math.inf]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_entries_whose_sum_overflows_pass(dtype):
    big = torch.finfo(dtype).max
    tensor = torch.full((4, 4), big, dtype=dtype)
    assert not torch.isfinite(tensor.sum())  # the fast path cannot decide: the entries are looked at
    checks.finite("x", tensor)


def test_largest_finite_is_the_largest_magnitude_of_each_tensor():
    torch.manual_seed(0)
    row = torch.randn(1, 5)
    row[0, 3] = -9.0  # the largest magnitude is negative
    expanded = row.expand(1000, 5)  # a broadcast view (stride 0), read once
    plain, empty = torch.randn(2, 3, 4), torch.empty(0, 4)
    largest = checks.largest_finite(a=expanded, b=plain, c=empty)
    assert largest == (9.0, plain.abs().max().item(), 0.0)
    assert checks.largest_finite(c=empty, b=plain, a=expanded) == (0.0, plain.abs().max().item(), 9.0)  # in order


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_largest_finite_names_the_tensor_with_a_bad_entry(bad):
    tensor = torch.ones(1, 4).expand(3, 4).clone()
    tensor[2, 1] = bad
    with pytest.raises(ValueError, match=rf"value contains a non-finite value {bad} at index \(2, 1\)"):
        checks.largest_finite(key=torch.ones(2), value=tensor)
