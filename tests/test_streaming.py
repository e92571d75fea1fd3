"""Per-token losses over a stream: the rolling caches against recomputing the window for every prediction."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from conftest import tiny_rotary_gpt as tiny
from selfattention.kv_cache import CachePolicy, RollingKVCache
from selfattention.streaming import stream_losses, window_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_full_stream_losses_equal_one_forward_pass() -> None:
    model = tiny(num_layers=2)
    ids = torch.randint(13, (24,), generator=torch.Generator().manual_seed(6))
    losses, caches = stream_losses(model, ids, CachePolicy("full"))
    with torch.no_grad():
        logits = model(ids[:-1].view(1, -1))[0][0]
    assert_close(losses, F.cross_entropy(logits, ids[1:], reduction="none"), rtol=1e-5, atol=1e-5)
    assert caches[0].length == 23  # every token but the last, which is only predicted


def test_one_layer_window_cache_is_the_recomputed_window() -> None:
    """One layer: a window of W positions inside the cache is exactly the model run on the last W tokens."""
    model = tiny()
    ids = torch.randint(13, (40,), generator=torch.Generator().manual_seed(7))
    losses, caches = stream_losses(model, ids, CachePolicy("window", window=8))
    assert_close(losses, window_losses(model, ids, 8, list(range(39))), rtol=1e-5, atol=1e-5)
    assert isinstance(caches[0], RollingKVCache) and caches[0].kept() == list(range(31, 39))


def test_deeper_layers_remember_evicted_tokens() -> None:
    """Two layers: once a token is evicted, the kept tokens' second-layer keys still carry it."""
    model = tiny(num_layers=2)
    ids = torch.randint(13, (20,), generator=torch.Generator().manual_seed(8))
    losses, _ = stream_losses(model, ids, CachePolicy("window", window=8))
    recomputed = window_losses(model, ids, 8, list(range(19)))
    assert_close(losses[:8], recomputed[:8], rtol=1e-5, atol=1e-5)  # nothing evicted yet
    assert (losses[8:] - recomputed[8:]).abs().max() > 1e-3


@pytest.mark.slow
def test_smollm2_window_only_breaks_once_the_first_token_goes_and_sinks_do_not(smollm2) -> None:
    """The attention sink on the real model: dropping the first tokens costs far more than keeping four."""
    from importlib.resources import files

    text = files("selfattention").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")
    ids = torch.tensor(smollm2.encode(text[:1000]))[:112]
    window = 32
    steps = list(range(window, len(ids) - 1, 2))
    recompute = window_losses(smollm2.model, ids, window, steps).mean()
    window_only, _ = stream_losses(smollm2.model, ids, CachePolicy("window", window=window))
    sinks, _ = stream_losses(smollm2.model, ids, CachePolicy("sinks", window=window - 4))
    full, _ = stream_losses(smollm2.model, ids[: window + 1], CachePolicy("full"))
    assert_close(window_only[:window], full, rtol=1e-4, atol=1e-4)  # the same until the first eviction
    assert_close(sinks[:window], full, rtol=1e-4, atol=1e-4)
    assert window_only[steps].mean() > recompute + 1.0, (window_only[steps].mean(), recompute)
    assert abs(sinks[steps].mean() - recompute) < 0.1 * recompute, (sinks[steps].mean(), recompute)
