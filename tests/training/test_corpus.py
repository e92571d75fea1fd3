"""Corpus reading, splitting and batches."""

from __future__ import annotations

import pytest
import torch

from selfattention.training.data import default_corpus, read_corpus, sample_batch, split


def test_default_corpus_is_shipped_shakespeare() -> None:
    text = read_corpus(None)
    assert text == default_corpus()
    assert len(text) > 300_000
    assert "MACBETH:\n" in text and "JULIET:\n" in text


def test_bad_corpora_are_named(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus .*empty.txt is empty"):
        read_corpus(empty)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(ValueError, match=r"blob.bin looks binary \(it contains a NUL byte at offset 3\)"):
        read_corpus(binary)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 3\)"):
        read_corpus(latin)
    with pytest.raises(OSError):
        read_corpus(tmp_path / "missing.txt")


def test_split_keeps_order() -> None:
    ids = torch.arange(100)
    train, val = split(ids, 0.1)
    assert torch.equal(torch.cat([train, val]), ids)
    assert len(val) == 10


def test_targets_are_inputs_shifted_by_one(generator: torch.Generator) -> None:
    ids = torch.arange(1000)
    x, y = sample_batch(ids, 4, 16, generator)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)


def test_ranks_slice_the_global_batch() -> None:
    """Two ranks with batch 3 together see the windows of one process with batch 6, in order."""
    ids = torch.arange(500)
    whole = sample_batch(ids, 6, 8, torch.Generator().manual_seed(5))
    parts = [sample_batch(ids, 3, 8, torch.Generator().manual_seed(5), rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([parts[0][0], parts[1][0]]), whole[0])
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), whole[1])


def test_too_short_for_the_context() -> None:
    with pytest.raises(ValueError, match=r"has 8 tokens, fewer than context \+ 1 = 9"):
        sample_batch(torch.arange(8), 1, 8, torch.Generator())
