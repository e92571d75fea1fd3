"""Attention rollout and flow against matrices and maximum flows worked out by hand (Abnar and Zuidema, 2020)."""

import pytest
import torch
from torch.testing import assert_close

from selfattention.rollout import MAX_FLOW_TOKENS, attention_flow, attention_rollout, residual_attention

# One head, three tokens, causal: token 2 reads 0.2 from each earlier token and 0.6 from itself.
CAUSAL = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]])
# Â = 0.5 α + 0.5 I, by hand:
CAUSAL_HAT = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.1, 0.1, 0.8]])


def test_residual_attention_averages_heads_then_adds_the_identity() -> None:
    heads = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (2, 2, 2)
    # mean over heads: all 0.5; 0.5 * 0.5 + 0.5 * I
    assert_close(residual_attention(heads), torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert_close(residual_attention(CAUSAL), CAUSAL_HAT)


def test_residual_attention_renormalises_rows_that_do_not_sum_to_one() -> None:
    dropped = torch.tensor([[[0.0, 0.5], [0.0, 1.0]]])  # row 0 sums to 0.5 (e.g. dropout in training mode)
    # row 0: 0.5 * [0, 0.5] + 0.5 * [1, 0] = [0.5, 0.25] -> / 0.75
    assert_close(residual_attention(dropped), torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]]))


def test_rollout_of_identity_attention_is_the_identity() -> None:
    eye = torch.eye(5).expand(4, 5, 5)  # 4 heads that each attend to themselves only
    assert_close(attention_rollout([eye, eye, eye]), torch.eye(5).expand(3, 5, 5))


def test_rollout_multiplies_later_layers_on_the_left() -> None:
    first = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # Â_1 = [[0.5, 0.5], [0, 1]]
    second = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # Â_2 = [[1, 0], [0.5, 0.5]]
    rolled = attention_rollout([first, second])
    assert_close(rolled[0], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    # Â_2 Â_1 = [[0.5, 0.5], [0.25, 0.75]]  (Â_1 Â_2 would be [[0.75, 0.25], [0.5, 0.5]])
    assert_close(rolled[1], torch.tensor([[0.5, 0.5], [0.25, 0.75]]))


@pytest.mark.parametrize("causal", [False, True])
def test_rollout_rows_sum_to_one_and_respect_the_causal_mask(causal: bool) -> None:
    torch.manual_seed(0)
    scores = torch.randn(6, 2, 4, 7, 7)  # (L, B, H, T, T)
    if causal:
        scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    layers = list(scores.softmax(dim=-1))
    rolled = attention_rollout(layers)
    assert rolled.shape == (6, 2, 7, 7)
    assert_close(rolled.sum(dim=-1), torch.ones(6, 2, 7))
    if causal:
        assert torch.equal(rolled[-1].triu(diagonal=1), torch.zeros(2, 7, 7))
    reference = torch.eye(7)
    for weights in layers:  # the definition, one layer at a time
        reference = (0.5 * weights.mean(dim=1) + 0.5 * torch.eye(7)) @ reference
    assert_close(rolled[-1], reference)


def test_flow_through_one_layer_is_the_capacity_of_the_single_edge() -> None:
    assert_close(attention_flow([CAUSAL]), CAUSAL_HAT)


def test_flow_through_two_layers_equals_the_maximum_flow_by_hand() -> None:
    # From (2, 2) to (0, 0) there are three disjoint paths, one through each middle token:
    #   via (1, 0): min(0.1, 1.0) = 0.1; via (1, 1): min(0.1, 0.25) = 0.1; via (1, 2): min(0.8, 0.1) = 0.1 -> 0.3
    # to (0, 1): via (1, 1): min(0.1, 0.75) = 0.1; via (1, 2): min(0.8, 0.1) = 0.1; (1, 0) has no edge -> 0.2
    # to (0, 2): only via (1, 2): min(0.8, 0.8) = 0.8
    flows = attention_flow([CAUSAL, CAUSAL], queries=[2])
    assert_close(flows, torch.tensor([[0.3, 0.2, 0.8]]))
    # rollout differs: Â² row 2 = 0.1 * [1, 0, 0] + 0.1 * [0.25, 0.75, 0] + 0.8 * [0.1, 0.1, 0.8]
    assert_close(attention_rollout([CAUSAL, CAUSAL])[-1, 2], torch.tensor([0.205, 0.155, 0.64]))


def test_flow_refuses_long_texts_and_bad_queries() -> None:
    long = torch.eye(MAX_FLOW_TOKENS + 1).unsqueeze(0)
    with pytest.raises(ValueError, match=f"limited to {MAX_FLOW_TOKENS} tokens.*has {MAX_FLOW_TOKENS + 1}"):
        attention_flow([long])
    with pytest.raises(ValueError, match=r"queries \[3\] out of range"):
        attention_flow([CAUSAL], queries=[3])
    with pytest.raises(ValueError, match="one text's"):
        attention_flow([CAUSAL.unsqueeze(0)])
    with pytest.raises(ValueError, match=r"must be \(heads, T, T\) for one T, got \[\(1, 3, 3\), \(1, 4, 4\)\]"):
        attention_flow([torch.eye(3).unsqueeze(0), torch.eye(4).unsqueeze(0)])  # as rollout refuses it


def test_rollout_refuses_mismatched_layers() -> None:
    with pytest.raises(ValueError, match="one shape"):
        attention_rollout([torch.eye(2).unsqueeze(0), torch.eye(3).unsqueeze(0)])
    with pytest.raises(ValueError, match=r"\(\.\.\., heads, tokens, tokens\), got shape \(1, 2, 3\)"):
        residual_attention(torch.ones(1, 2, 3))


def test_float64_weights_roll_out_in_float64() -> None:
    weights = torch.rand(2, 3, 3, dtype=torch.float64).softmax(-1)
    assert attention_rollout([weights, weights]).dtype == torch.float64
    assert attention_flow([weights, weights]).dtype == torch.float64  # flow too, as rollout
    assert attention_rollout([weights.float()]).dtype == residual_attention(weights.bfloat16()).dtype == torch.float32
