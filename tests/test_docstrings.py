"""The ``>>>`` examples in the modules' and inspection's docstrings run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import selfattention.inspect
import selfattention.modules


@pytest.mark.parametrize("module", [selfattention.modules, selfattention.inspect])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": __import__("torch")}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
