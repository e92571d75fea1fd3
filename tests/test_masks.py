"""Mask descriptions: the tensors they build, their tile classification, and their errors."""

from __future__ import annotations

import pytest
import torch

from selfattention import attention, masks
from selfattention.masks import EMPTY, FULL, PARTIAL


def grid(t, s):
    """Query and key positions as ``(T, 1)`` and ``(1, S)``; queries sit at the last T key positions."""
    return torch.arange(t).unsqueeze(-1) + (s - t), torch.arange(s).unsqueeze(0)


@pytest.mark.parametrize(("t", "s"), [(5, 5), (3, 7), (7, 3)])
def test_rules_build_the_tensors_they_describe(t, s):
    p, j = grid(t, s)
    i = torch.arange(t).unsqueeze(-1)
    cases = {
        "causal": (masks.causal(), j <= p),
        "causal top-left": (masks.causal(align="top_left"), j <= i),
        "window": (masks.sliding_window(3), (j <= p) & (j > p - 3)),
        "prefix": (masks.prefix_lm(2), (j < 2) | (j <= p)),
        "or": (masks.sliding_window(1) | masks.causal(align="top_left"), (j == p) | (j <= i)),
    }
    for name, (rule, want) in cases.items():
        got = rule.materialize(1, 1, t, s)
        assert got.shape[-2:] == (t, s), name
        assert torch.equal(got[0, 0], want), name


def test_padding_and_documents_are_per_batch_row():
    got = masks.padding([2, 4]).materialize(2, 3, 3, 4)
    assert got.shape == (2, 1, 3, 4)
    assert got[0, 0].tolist() == [[True, True, False, False]] * 3
    assert bool(got[1].all())
    ids = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    docs = masks.documents(ids).materialize(2, 1, 4, 4)
    for b in range(2):
        assert torch.equal(docs[b, 0], ids[b].unsqueeze(-1) == ids[b].unsqueeze(0))


RULES = {
    "causal": masks.causal(),
    "top_left": masks.causal(align="top_left"),
    "window": masks.sliding_window(5),
    "padding": masks.padding([3, 11]),
    "documents": masks.documents([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]),
    "prefix": masks.prefix_lm(4),
    "docs&causal": masks.documents([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]) & masks.causal(),
    "window|padding": masks.sliding_window(2) | masks.padding([6, 1]),
}


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(("block_q", "block_k"), [(1, 1), (2, 3), (4, 4), (11, 5)])
def test_block_map_is_exact_for_the_built_in_rules(name, block_q, block_k):
    """Each tile is FULL/EMPTY exactly when the materialised mask is all True/all False over (b, h)."""
    rule = RULES[name]
    allowed = rule.materialize(2, 1, 11, 11).expand(2, 1, 11, 11)
    want = torch.full((-(-11 // block_q), -(-11 // block_k)), PARTIAL, dtype=torch.int8)
    for a in range(want.shape[0]):
        for c in range(want.shape[1]):
            tile = allowed[..., a * block_q : (a + 1) * block_q, c * block_k : (c + 1) * block_k]
            want[a, c] = FULL if bool(tile.all()) else EMPTY if not bool(tile.any()) else PARTIAL
    assert torch.equal(rule.block_map(2, 1, 11, 11, block_q, block_k), want)
    generic = masks.from_function(lambda b, h, q, kv: rule.allowed(b, h, q, kv, 11, 11))
    assert torch.equal(generic.block_map(2, 1, 11, 11, block_q, block_k), want)


def test_block_map_of_a_chunk_uses_global_positions():
    rule = masks.causal()
    whole = rule.block_map(1, 1, 12, 12, 3, 3)
    chunk = rule.block_map(1, 1, 12, 12, 3, 3, q_range=(6, 12), kv_range=(0, 6))
    assert torch.equal(chunk, whole[2:, :2])


def test_unsorted_document_ids_stay_correct_but_conservative():
    rule = masks.documents([0, 1, 0, 1])
    kinds = rule.block_map(1, 1, 4, 4, 2, 2)
    assert bool((kinds == PARTIAL).all())  # every tile mixes ids; none may be skipped


def test_from_function_equals_the_same_mask_as_a_tensor():
    rule = masks.from_function(lambda b, h, q, kv: ((q + kv + h) % 3 != 0) | (kv == 0))
    q, k, v = (torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    tensor = rule.materialize(1, 2, 70, 70)
    for backend in ("tiled", "blocksparse", "sdpa", "math"):
        got = attention(q, k, v, mask=rule, backend=backend)
        want = attention(q, k, v, mask=tensor, backend="math")
        torch.testing.assert_close(got, want, msg=lambda m, b=backend: f"{b}: {m}")


def test_invalid_descriptions_are_clear_errors():
    q = torch.randn(2, 1, 4, 3)
    with pytest.raises(ValueError, match=r"padding lengths \(\[2, 5\]\) exceed the number of keys \(4\)"):
        attention(q, q, q, mask=masks.padding([2, 5]))
    with pytest.raises(ValueError, match="3 batch rows but the attention has batch 2"):
        attention(q, q, q, mask=masks.padding([1, 2, 3]))
    with pytest.raises(ValueError, match="document ids cover 5 positions but there are 4 keys"):
        attention(q, q, q, mask=masks.documents([0, 0, 1, 1, 1]))
    with pytest.raises(TypeError, match=r"padding lengths must be integers, got dtype torch\.float32"):
        masks.padding([1.5])
    with pytest.raises(ValueError, match="non-negative"):
        masks.padding([-1])
    with pytest.raises(ValueError, match="sliding window size must be a positive integer, got 0"):
        masks.sliding_window(0)
    with pytest.raises(ValueError, match="align must be"):
        masks.causal(align="left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix length"):
        masks.prefix_lm(-2)
    with pytest.raises(TypeError, match=r"must return a boolean tensor, got dtype torch\.int64"):
        attention(q, q, q, mask=masks.from_function(lambda b, h, qi, kv: qi - kv))
    with pytest.raises(TypeError, match="can only combine mask descriptions"):
        masks.causal() & torch.ones(4, 4, dtype=torch.bool)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.ones(4, 5, dtype=torch.bool), ValueError, r"mask of shape \(4, 5\) does not broadcast"),
        (torch.ones(4, 4, dtype=torch.int64), TypeError, "must be boolean .* got dtype torch.int64"),
        ([[True]], TypeError, "mask must be a torch.Tensor or a mask description, got list"),
    ],
)
def test_invalid_tensor_masks_are_clear_errors_for_every_backend(mask, error, match):
    q = torch.randn(1, 4, 3)
    for backend in ("tiled", "blocksparse", "auto"):
        with pytest.raises(error, match=match):
            attention(q, q, q, mask=mask, backend=backend)
