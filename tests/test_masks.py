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
        "and": (masks.sliding_window(3) & masks.causal(align="top_left"), (j <= p) & (j > p - 3) & (j <= i)),
    }
    if t <= s:  # documents need the queries among the keys
        ids = torch.tensor([0, 0, 1, 1, 1, 2, 2][:s])
        cases["documents"] = (masks.documents(ids), ids[p] == ids[j])
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


# Built inside each test (not at import): a description is then made by the code under test, as a user's is.
RULES = {
    "causal": lambda: masks.causal(),
    "top_left": lambda: masks.causal(align="top_left"),
    "window": lambda: masks.sliding_window(5),
    "padding": lambda: masks.padding([3, 11]),
    "documents": lambda: masks.documents([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]),
    "negative ids": lambda: masks.documents([-4, -4, -4, -4, -4, -3, -3, -3, -3, -3, -3]),
    "prefix": lambda: masks.prefix_lm(4),
    "docs&causal": lambda: masks.documents([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]) & masks.causal(),
    "window|padding": lambda: masks.sliding_window(2) | masks.padding([6, 1]),
}


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(("block_q", "block_k"), [(1, 1), (2, 3), (4, 4), (11, 5)])
@pytest.mark.parametrize(("t", "s"), [(11, 11), (6, 11), (11, 9)])
def test_block_map_is_exact_for_the_built_in_rules(name, block_q, block_k, t, s):
    """Each tile is FULL/EMPTY exactly when the materialised mask is all True/all False over (b, h).

    T != S puts the queries at the last T key positions (an offset in every rule that has one)."""
    rule = RULES[name]()
    try:
        allowed = rule.materialize(2, 1, t, s).expand(2, 1, t, s)
    except ValueError:
        pytest.skip(f"{name} does not fit T={t}, S={s}")
    want = torch.full((-(-t // block_q), -(-s // block_k)), PARTIAL, dtype=torch.int8)
    for a in range(want.shape[0]):
        for c in range(want.shape[1]):
            tile = allowed[..., a * block_q : (a + 1) * block_q, c * block_k : (c + 1) * block_k]
            want[a, c] = FULL if bool(tile.all()) else EMPTY if not bool(tile.any()) else PARTIAL
    got = rule.block_map(2, 1, t, s, block_q, block_k)
    assert got.dtype == torch.int8
    assert torch.equal(got, want)
    generic = masks.from_function(lambda b, h, q, kv: rule.allowed(b, h, q, kv, t, s))
    assert torch.equal(generic.block_map(2, 1, t, s, block_q, block_k), want)


def test_built_in_rules_and_their_combinations_are_classified_without_evaluating_them(monkeypatch):
    """The tiles of built-in rules come from the tile bounds (O(tiles)); only a rule given as a function
    (or a combination with one) is evaluated position by position."""
    calls = []
    monkeypatch.setattr(masks.MaskDescription, "block", lambda self, *a, **k: calls.append(self) or 1 / 0)
    for name, make in RULES.items():
        make().block_map(2, 1, 11, 11, 4, 4)
        assert calls == [], name
    with pytest.raises(ZeroDivisionError):
        (masks.causal() & masks.from_function(lambda b, h, q, kv: q >= kv)).block_map(1, 1, 8, 8, 4, 4)


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


def test_padding_and_documents_with_one_row_apply_to_every_batch_row():
    assert masks.padding([2]).materialize(3, 1, 2, 4)[:, 0].tolist() == [[[True, True, False, False]] * 2] * 3
    ids = [0, 1, 1]
    want = [[[True, False, False], [False, True, True], [False, True, True]]] * 2
    assert masks.documents(ids).materialize(2, 1, 3, 3)[:, 0].tolist() == want


def test_combinations_pass_every_index_and_check_both_sides():
    by_head = masks.from_function(lambda b, h, q, kv: kv <= q - h)
    for both in (by_head & masks.causal(), masks.causal() & by_head):  # causal adds nothing to kv <= q - h
        assert torch.equal(both.materialize(1, 2, 4, 4), by_head.materialize(1, 2, 4, 4)), both
    assert (masks.padding([1, 3]) | masks.causal()).materialize(2, 1, 3, 3)[1, 0, 0].tolist() == [True] * 3
    with pytest.raises(ValueError, match="padding lengths has 3 batch rows but the attention has batch 2"):
        (masks.causal() & masks.padding([1, 2, 3])).materialize(2, 1, 3, 3)
    with pytest.raises(ValueError, match="document ids has 3 batch rows but the attention has batch 2"):
        (masks.causal() | masks.documents([[0, 1]] * 3)).materialize(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"documents\(\) needs T <= S \(queries are the last T keys\), got T=3"):
        (masks.causal() & masks.documents([0, 1])).materialize(1, 1, 3, 2)


def test_descriptions_print_as_the_calls_that_made_them():
    def near(b, h, q, kv):
        return (q - kv).abs() <= 1

    assert repr(masks.causal()) == "causal(align='bottom_right')"
    assert repr(masks.sliding_window(3)) == "sliding_window(3)"
    assert repr(masks.padding([2, 4])) == "padding([2, 4])"
    assert repr(masks.documents([[0, 0, 1]])) == "documents(<(1, 3) ids>)"
    assert repr(masks.from_function(near)) == "from_function(near)"
    assert repr(masks.causal() & masks.sliding_window(2)) == "(causal(align='bottom_right') & sliding_window(2))"
    assert repr(masks.sliding_window(2) | masks.padding([1])) == "(sliding_window(2) | padding([1]))"


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: masks.sliding_window(2.5), ValueError, "sliding window size must be a positive integer, got 2.5"),
        (lambda: masks.sliding_window(True), ValueError, "sliding window size must be a positive integer, got True"),
        (lambda: masks.prefix_lm(1.5), ValueError, "prefix length must be a non-negative integer, got 1.5"),
        (lambda: masks.prefix_lm(True), ValueError, "prefix length must be a non-negative integer, got True"),
        (lambda: masks.padding(3), ValueError, r"padding lengths must have 1 dimension\(s\) at most, got shape \(\)"),
        (lambda: masks.padding([[1, 2]]), ValueError, r"padding lengths must have 1 dimension\(s\) .* \(1, 2\)"),
        (
            lambda: masks.padding(torch.tensor([], dtype=torch.long)),
            ValueError,
            r"padding lengths must be non-negative and not empty, got \[\]",
        ),
        (lambda: masks.documents([[[0, 1]]]), ValueError, r"document ids must have 2 dimension\(s\) .* \(1, 1, 2\)"),
        (lambda: masks.documents([0.0, 1.0]), TypeError, r"document ids must be integers, got dtype torch\.float32"),
        (lambda: masks.causal() | torch.ones(2, 2), TypeError, "can only combine mask descriptions, got Tensor"),
    ],
)
def test_invalid_arguments_name_the_argument_and_the_value(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_edge_values_that_are_valid_stay_valid():
    assert (
        masks.prefix_lm(0).materialize(1, 1, 3, 3)[0, 0].tolist()
        == masks.causal().materialize(1, 1, 3, 3)[0, 0].tolist()
    )
    assert masks.padding([0, 2]).materialize(2, 1, 1, 2)[:, 0, 0].tolist() == [[False, False], [True, True]]
    assert masks.padding([5]).materialize(1, 1, 1, 5).all()


def test_a_rule_that_returns_no_tensor_is_named():
    with pytest.raises(TypeError, match="a mask rule must return a boolean tensor, got bool"):
        masks.from_function(lambda b, h, q, kv: True).materialize(1, 1, 2, 2)


def test_rules_given_as_functions_may_leave_out_axes_and_are_classified_on_a_chunk():
    by_query = masks.from_function(lambda b, h, q, kv: q % 3 == 0)  # (1, 1, T, 1): no key axis
    whole = by_query.block_map(1, 1, 9, 12, 3, 4)
    assert whole.dtype == torch.int8
    assert torch.equal(by_query.block_map(1, 1, 9, 12, 3, 4, kv_range=(4, 12)), whole[:, 1:])
    two_d = masks.from_function(lambda b, h, q, kv: (kv <= q)[0, 0])  # (T, S)
    assert torch.equal(two_d.materialize(1, 1, 4, 4), masks.causal().materialize(1, 1, 4, 4))
    for rule in (by_query, masks.documents([0] * 6 + [1] * 6)):  # an empty range of queries: no tiles
        empty = rule.block_map(1, 1, 9, 12, 3, 4, q_range=(9, 9))
        assert (empty.shape, empty.dtype) == ((0, 3), torch.int8), rule
    generic_and = masks.from_function(lambda b, h, q, kv: kv >= 0) & masks.causal()
    assert torch.equal(generic_and.block_map(1, 1, 6, 11, 2, 3), masks.causal().block_map(1, 1, 6, 11, 2, 3))


def test_rules_of_a_wrong_shape_name_it():
    five = masks.from_function(lambda b, h, q, kv: (q >= kv).unsqueeze(0))
    with pytest.raises(ValueError, match=r"returned shape \(1, 1, 1, 3, 3\), which is not 4-D \(1, 1, 3, 3\)"):
        five.materialize(1, 1, 3, 3)
    wide = masks.from_function(lambda b, h, q, kv: torch.ones(1, 1, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"returned shape \(1, 1, 4, 3\), not broadcastable to \(1, 1, 3, 3\)"):
        wide.materialize(1, 1, 3, 3)
    with pytest.raises(TypeError, match="from_function needs a callable, got int"):
        masks.from_function(3)  # type: ignore[arg-type]
    assert repr(masks.from_function(type("Rule", (), {"__call__": lambda *a: None})())) == "from_function(fn)"


def test_is_causal_only_where_causal_true_means_the_same():
    assert masks.is_causal(masks.causal(), 3, 5)
    assert not masks.is_causal(masks.causal(align="top_left"), 3, 5)
    assert masks.is_causal(masks.causal(align="top_left"), 4, 4)
    assert not masks.is_causal(masks.sliding_window(4), 4, 4)
    assert not masks.is_causal(torch.ones(4, 4, dtype=torch.bool), 4, 4)


def test_shift_invariant_rules_give_equal_tiles_at_equal_offsets() -> None:
    """``shift_invariant`` promises that a rule reads only ``q - kv``: the block-sparse backend then makes
    one mask per offset. It holds for causal and sliding windows and what combines only them."""
    invariant = [masks.causal(), masks.sliding_window(5), masks.sliding_window(5) & masks.causal(),
                 masks.sliding_window(3) | masks.sliding_window(7)]  # fmt: skip
    others = [masks.documents([0] * 20 + [1] * 20), masks.padding([30]), masks.prefix_lm(4),
              masks.from_function(lambda b, h, q, kv: kv <= q), masks.causal() & masks.padding([30])]  # fmt: skip
    assert [rule.shift_invariant for rule in invariant] == [True] * 4
    assert [rule.shift_invariant for rule in others] == [False] * 5
    for rule in invariant:
        full = rule.materialize(1, 1, 32, 40)[0, 0]  # (T, S) = (32, 40)
        for q0, k0 in [(0, 0), (8, 8), (16, 16), (8, 16), (0, 16), (16, 0)]:  # tiles inside (32, 40)
            assert torch.equal(full[q0 : q0 + 8, k0 : k0 + 16], full[q0 + 8 : q0 + 16, k0 + 8 : k0 + 24])


def test_version_changes_with_an_in_place_edit_and_is_unknown_for_functions() -> None:
    lengths, ids = torch.tensor([3, 5]), torch.tensor([0, 0, 1, 1, 1])
    rule = masks.padding(lengths) & masks.documents(ids) & masks.sliding_window(2)
    before = rule.version()
    assert before is not None and masks.causal().version() == ()
    lengths_rule = rule.left.left  # type: ignore[attr-defined]
    lengths_rule.lengths[0] = 4  # the description's own tensor, edited in place
    assert rule.version() != before
    assert (masks.documents(ids) | masks.from_function(lambda b, h, q, kv: kv <= q)).version() is None


def test_window_is_the_widest_reach_a_rule_allows() -> None:
    w5, w9 = masks.sliding_window(5), masks.sliding_window(9)
    assert w5.window == 5 and masks.causal().window is None and masks.documents([0, 0]).window is None
    assert (w5 & w9).window == 5 and (w9 & masks.causal()).window == 9  # both must allow: the narrower
    assert (w5 | w9).window == 9 and (w5 | masks.causal()).window is None  # either may: the wider, or none
