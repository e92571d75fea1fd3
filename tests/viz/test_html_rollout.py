"""The whole model's attention rollout on the viewer page: the same numbers as :func:`attention_rollout`."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from selfattention import MultiHeadAttention, capture
from selfattention.rollout import attention_rollout
from selfattention.viz import AttentionView, to_html, view_from_capture
from selfattention.viz import html as page
from selfattention.viz.sources import example_view
from viewer_pages import decode, page_data, tiny_head

TOKENS = [f"t{i}" for i in range(12)]


@pytest.fixture(scope="module")
def captured():
    """Three causal layers with grouped heads, run on two rows (the page shows row 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *(MultiHeadAttention(8, 8, 16, 0.0, num_heads=4, num_kv_heads=2, causal=True) for _ in range(3))
    )
    with capture(model.eval()) as cap, torch.no_grad():
        model(torch.randn(2, len(TOKENS), 8))
    reference = attention_rollout([record.weights[1] for _, record in cap.items()])[-1]  # (T, T)
    return cap, reference


def test_the_page_carries_the_rollout_of_the_captured_weights(captured):
    cap, reference = captured
    data = page_data(to_html(cap, TOKENS, batch=1))
    shown = decode(data["rollout"])
    assert_close(shown, reference)  # float32 on the page, as the weights
    assert_close(shown.sum(dim=-1), torch.ones(len(TOKENS)))
    assert shown.triu(1).abs().max() == 0  # causal: no token draws on a later one
    assert_close(torch.tensor(view_from_capture(cap, TOKENS, batch=1).rollout), reference)


def test_a_compact_page_keeps_its_rollout(captured):
    cap, reference = captured
    compact = page_data(to_html(cap, TOKENS, batch=1, top_k=3))
    assert "topk" in compact["layers"][2]["heads"][0]
    assert_close(decode(compact["rollout"]), reference)


def test_the_rollout_counts_in_the_page_budget(captured):
    cap, _ = captured
    budget = 16_000  # every head in full takes 15,360 bytes: with the rollout (768) that is too much
    view = view_from_capture(cap, TOKENS, budget=budget)
    assert view.rollout is not None and isinstance(view.layers[0][0], page.TopKHead)
    assert len(json.dumps(page._payload(view))) < budget
    edge = 4 * page._rollout_bytes(len(TOKENS))  # the rollout may take up to a quarter of the budget
    assert view_from_capture(cap, TOKENS, budget=edge).rollout is not None
    assert view_from_capture(cap, TOKENS, budget=edge - 1).rollout is None


def test_one_layer_or_a_hand_built_view_has_no_rollout(captured):
    cap, _ = captured
    assert "rollout" not in page_data(to_html(cap["0"], TOKENS))
    assert "rollout" not in page_data(example_view().to_html())


def test_a_rollout_of_the_wrong_size_is_named():
    with pytest.raises(ValueError, match=r"rollout has shape \(1, 1\) but 2 tokens"):
        AttentionView(["a", "b"], [[page.HeadData.from_lists(**tiny_head())]], rollout=[[1.0]])
