"""The viewer's page of a streamed run's last step: the kept tokens, the sinks and the evicted marker."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_rotary_gpt
from selfattention.kv_cache import CachePolicy
from selfattention.viz.stream_view import streaming_view

pytestmark = pytest.mark.usefixtures("one_thread")


def test_last_step_view_is_the_step_the_cache_computed() -> None:
    model = tiny_rotary_gpt(num_layers=2)
    ids = torch.randint(13, (20,), generator=torch.Generator().manual_seed(9))
    pieces = [f"t{i}" for i in range(20)]
    policy = CachePolicy("sinks", window=6, sinks=2)
    view = streaming_view(model, ids, pieces, policy)
    assert view.tokens == ["⚓t0", "⚓t1", "⋯ 12 evicted ⋯", *[f"t{i}" for i in range(14, 20)]]
    assert len(view.layers) == 2 and all(len(heads) == 4 for heads in view.layers)
    for layer, heads in enumerate(view.layers):
        for head in heads:
            weights, scores = torch.tensor(head.weights), torch.tensor(head.scores)
            query, key = torch.tensor(head.query), torch.tensor(head.key)
            assert weights[:-1].abs().sum() == 0 and weights[-1, 2] == 0  # one real row; the marker unseen
            assert_close(weights[-1].sum(), torch.tensor(1.0))
            assert_close(query[-1] @ key.T, scores[-1], rtol=1e-5, atol=1e-5)  # what the page recomputes
            shown = [0, 1, *range(3, 9)]
            expected = torch.softmax(scores[-1, shown] * view.scales[layer], dim=-1)
            assert_close(weights[-1, shown], expected, rtol=1e-5, atol=1e-6)


def test_a_stream_that_fits_has_no_marker_and_bad_pieces_are_refused() -> None:
    model = tiny_rotary_gpt()
    ids = torch.arange(5)
    view = streaming_view(model, ids, list("abcde"), CachePolicy("window", window=8))
    assert view.tokens == list("abcde")
    with pytest.raises(ValueError, match="one piece per token id and at least one: 4 pieces, 5 ids"):
        streaming_view(model, ids, list("abcd"), CachePolicy("full"))
