"""Compact viewer pages: the top keys of every row, exact, when the full page would be too large."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from selfattention import MultiHeadAttention, capture
from selfattention.viz import html
from selfattention.viz.html import HeadData, TopKHead, to_html, view_from_capture
from viewer_pages import decode, page_data


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(MultiHeadAttention(8, 8, 64, 0.0, num_heads=4, num_kv_heads=2) for _ in range(2)))
    with capture(model.eval()) as cap, torch.no_grad():
        model(torch.randn(1, 48, 8))
    return cap, [f"t{i}" for i in range(48)]


def test_small_pages_stay_full_and_large_ones_keep_what_fits(captured):
    cap, tokens = captured
    full = view_from_capture(cap, tokens)
    assert all(isinstance(head, HeadData) for head in full.layers[0])
    budget = 20_000
    compact = view_from_capture(cap, tokens, budget=budget)
    head = compact.layers[1][3]
    assert isinstance(head, TopKHead)
    rows = 2 * 4 * 48
    assert head.weights.shape == (48, (budget * 9 // 10 * 3 // 4 // rows - 8) // 6)  # the most keys that fit
    assert compact.rollout is None  # 48 × 48 floats would take more than a quarter of the budget
    page_data = len(json.dumps(html._payload(compact)))
    assert page_data < budget < len(json.dumps(html._payload(full)))


def test_the_page_carries_the_exact_top_keys(captured):
    cap, tokens = captured
    data = page_data(to_html(cap, tokens, top_k=5))
    topk = data["layers"][1]["heads"][3]["topk"]
    weights = decode(topk["w"])
    keys = np.frombuffer(base64.b64decode(topk["j"]), dtype="<u2").reshape(48, 5)
    rest = decode(topk["rest"])
    full = cap["1"].weights[0, 3]  # (T, S)
    expected = torch.topk(full, 5, dim=-1)
    assert weights.shape == (48, 5)
    assert_close(weights, expected.values, atol=1e-6, rtol=0)
    assert_close(full.gather(-1, torch.from_numpy(keys.astype("int64"))), expected.values, atol=1e-6, rtol=0)
    assert_close(rest, 1 - expected.values.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    assert_close(decode(topk["lse"]), cap["1"].lse[0, 3].unsqueeze(-1))  # one column, like rest


def test_top_k_below_one_is_refused(captured):
    cap, tokens = captured
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        view_from_capture(cap, tokens, top_k=0)
