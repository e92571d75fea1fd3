"""MultiHeadAttention with a mask description as ``attn_mask``: the same as the mask given as a tensor."""

from __future__ import annotations

import pytest
import torch

from selfattention import masks
from selfattention.modules import MultiHeadAttention


def module(backend="auto"):
    torch.manual_seed(0)
    return MultiHeadAttention(16, 16, context_length=80, dropout=0.0, num_heads=4, backend=backend).eval()


@pytest.mark.parametrize("rule", [masks.sliding_window(5), masks.documents(torch.arange(70) // 20) & masks.causal()])
def test_description_equals_its_tensor_alone_with_padding_and_with_weights(rule):
    x = torch.randn(2, 70, 16, generator=torch.Generator().manual_seed(1))
    tensor = rule.materialize(2, 4, 70, 70)
    mha, reference = module(), module("math")
    torch.testing.assert_close(mha(x, attn_mask=rule), reference(x, attn_mask=tensor))
    padding = torch.arange(70) < torch.tensor([[70], [50]])  # (B, S), True = a real token
    torch.testing.assert_close(
        mha(x, attn_mask=rule, key_padding_mask=padding), reference(x, attn_mask=tensor, key_padding_mask=padding)
    )
    out, weights = mha(x, attn_mask=rule, return_weights=True)
    torch.testing.assert_close(out, reference(x, attn_mask=tensor))
    assert bool((weights.masked_select(~tensor.expand_as(weights)) == 0).all())


def test_unbatched_input_and_a_bad_mask():
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(2))
    mha = module()
    torch.testing.assert_close(mha(x, attn_mask=masks.prefix_lm(4)), mha(x[None], attn_mask=masks.prefix_lm(4))[0])
    with pytest.raises(ValueError, match="padding lengths"):
        mha(x[None], attn_mask=masks.padding([40]))


def test_unbatched_description_with_weights_and_padding_equals_its_tensor():
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(3))
    rule = masks.prefix_lm(4)
    tensor = rule.materialize(1, 4, 30, 30)[0]  # (H, T, S), broadcast over the heads
    mha, reference = module(), module("math")
    out, weights = mha(x, attn_mask=rule, return_weights=True)
    want_out, want_weights = reference(x, attn_mask=tensor, return_weights=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(weights, want_weights)
    padding = torch.arange(30) < 25  # (S,), True = a real token
    torch.testing.assert_close(
        mha(x, attn_mask=rule, key_padding_mask=padding), reference(x, attn_mask=tensor, key_padding_mask=padding)
    )
