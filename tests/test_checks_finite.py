"""checks.finite takes a one-pass shortcut (a sum); it must still name bad entries and pass large finite ones."""

from __future__ import annotations

import pytest
import torch

from selfattention import checks


def test_large_finite_values_whose_sum_overflows_pass():
    checks.finite("query", torch.full((4, 2), 3e38))  # the sum is inf, every entry is finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entry_is_named_with_its_index(bad):
    tensor = torch.zeros(3, 4)
    tensor[2, 1] = bad
    with pytest.raises(ValueError, match=rf"key contains a non-finite value {bad} at index \(2, 1\)"):
        checks.finite("key", tensor)
