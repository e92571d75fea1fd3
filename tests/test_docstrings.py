"""The ``>>>`` examples in the library's docstrings run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import selfattention.backends.tiled
import selfattention.files
import selfattention.functional
import selfattention.inspect
import selfattention.loaders.gguf
import selfattention.masks
import selfattention.models.gpt
import selfattention.models.llama
import selfattention.modules
import selfattention.training.tokenizer

MODULES = [
    selfattention.functional,
    selfattention.masks,
    selfattention.backends.tiled,
    selfattention.modules,
    selfattention.inspect,
    selfattention.models.gpt,
    selfattention.models.llama,
    selfattention.loaders.gguf,
    selfattention.training.tokenizer,
    selfattention.files,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": __import__("torch")}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
