"""MultiHeadAttention calls the strategy it holds; LocalAttention is attention in this process."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from selfattention import MultiHeadAttention
from selfattention.distributed import ContextParallel
from selfattention.functional import attention_scores, attention_weights, causal_mask, context_vectors
from selfattention.strategies import LocalAttention


class Recording(LocalAttention):
    """LocalAttention that records what the module asked of it and refuses a KV cache."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def check_call(self, *, dropout: float, unsupported: dict[str, object]) -> None:
        if unsupported["kv_cache"] is not None:
            raise ValueError("no kv_cache here")

    def attend(self, module, query, key, value, **kwargs):
        self.calls.append((tuple(query.shape), kwargs["causal"]))
        return super().attend(module, query, key, value, **kwargs)


def test_the_default_strategy_is_local_and_a_context_parallel_option_becomes_the_strategy() -> None:
    assert isinstance(MultiHeadAttention(4, 4, None, 0.0, 2).strategy, LocalAttention)
    option = ContextParallel(layout="zigzag")
    assert MultiHeadAttention(4, 4, None, 0.0, 2, context_parallel=option).strategy is option


@pytest.mark.parametrize("tokens", [1, 5])
def test_local_attention_is_causal_attention_per_head(tokens: int) -> None:
    torch.manual_seed(0)
    module = MultiHeadAttention(6, 6, None, 0.0, 2).double()
    q, k, v = (torch.randn(2, 2, tokens, 3, dtype=torch.float64) for _ in range(3))
    context, weights = LocalAttention().attend(
        module, q, k, v, mask=None, causal=True, return_weights=True, bounds=None
    )
    want_weights = attention_weights(attention_scores(q, k), mask=causal_mask(tokens, tokens), scale=3**-0.5)
    assert weights is not None
    assert_close(weights, want_weights)
    assert_close(context, context_vectors(want_weights, v))


def test_the_module_checks_then_attends_through_its_strategy() -> None:
    torch.manual_seed(0)
    module = MultiHeadAttention(6, 6, None, 0.0, 2)
    x = torch.randn(3, 4, 6)
    want = module(x)
    module.strategy = recording = Recording()
    assert_close(module(x), want)
    assert recording.calls == [((3, 2, 4, 3), True)]  # the module's own causal flag, whole-sequence
    with pytest.raises(ValueError, match="no kv_cache here"):
        module(x, kv_cache=module.make_kv_cache(3, 8))
    assert len(recording.calls) == 1
