"""capture(): records per module and per head, agrees with the fast path, and leaves no trace when done."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from selfattention import (
    CausalAttention,
    MultiHeadAttention,
    SelfAttentionV1,
    capture,
    capture_projections,
)
from selfattention.backends import BACKENDS
from selfattention.examples import embeddings
from selfattention.functional import causal_mask


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = MultiHeadAttention(8, 8, 16, 0.0, 4, num_kv_heads=2)
        self.blocks = torch.nn.ModuleList([MultiHeadAttention(8, 8, 16, 0.0, 2, causal=False)])

    def forward(self, x):
        return self.blocks[0](self.first(x))


def test_records_every_module_by_qualified_name_and_head():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    x = torch.randn(3, 5, 8)
    with capture(model) as cap:
        model(x)
    assert cap.names == ["first", "blocks.0"]
    first = cap["first"]
    assert first.query.shape == (3, 4, 5, 2) and first.key.shape == (3, 2, 5, 2)
    assert first.weights.shape == first.scores.shape == (3, 4, 5, 5)
    assert first.context.shape == (3, 4, 5, 2)
    assert first.num_heads == 4 and first.num_kv_heads == 2 and first.causal
    assert first.scale == pytest.approx(1 / math.sqrt(2))
    # head 3 reads key/value head 1
    head = first.head(3)
    assert torch.equal(head.key, first.key[:, 1]) and torch.equal(head.weights, first.weights[:, 3])
    # the records are consistent: α = softmax(ω · scale) under the causal mask, z = α V
    masked = head.scores.masked_fill(~causal_mask(5, 5), -math.inf)
    assert_close(head.weights, torch.softmax(masked * first.scale, dim=-1))
    assert_close(head.context, head.weights @ head.value)
    assert_close(head.scores, head.query @ head.key.transpose(-2, -1))
    assert not first.weights.requires_grad
    with pytest.raises(IndexError, match="head 4 out of range: the module has 4 heads"):
        first.head(4)


def test_capture_gives_the_fast_path_output_and_context():
    torch.manual_seed(1)
    module = MultiHeadAttention(12, 12, 16, 0.0, 3).eval()
    x = torch.randn(2, 6, 12)
    fast = module(x)
    with capture(module) as cap:
        recorded = module(x)
    assert_close(recorded, fast, atol=1e-6, rtol=1e-5)
    context = cap[""].context  # (B, H, T, D) -> (B, T, H * D) -> out_proj
    assert_close(module.out_proj(context.transpose(1, 2).reshape(2, 6, 12)), fast, atol=1e-6, rtol=1e-5)


def test_eager_only_while_active(monkeypatch):
    calls: dict[str, int] = {}
    for name, backend in list(BACKENDS.items()):

        def fn(*args, _name=name, _fn=backend.fn, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(backend, fn=fn, supports_dropout=True))
    module = MultiHeadAttention(8, 8, 16, 0.0, 2).eval()
    x = torch.randn(1, 4, 8)
    with capture(module):
        module(x)
    assert calls == {"math": 1}
    module(x)
    assert calls == {"math": 1, "sdpa": 1}
    assert module._recorder is None


def test_one_record_per_call_and_unbatched_shapes():
    module = MultiHeadAttention(8, 8, 16, 0.0, 2).eval()
    with capture(module) as cap:
        module(torch.randn(4, 8))
        module(torch.randn(3, 8))
    assert [r.weights.shape for r in cap.calls("")] == [(2, 4, 4), (2, 3, 3)]
    assert cap[""].head(1).weights.shape == (3, 3)
    cap.clear()
    with pytest.raises(KeyError, match="has not run"):
        cap[""]
    with pytest.raises(KeyError, match=r"no attention module named 'x'; the model has \[''\]"):
        cap["x"]


def test_single_head_modules_record_one_head():
    torch.manual_seed(123)
    module = SelfAttentionV1(3, 2)
    with capture(module) as cap:
        out = module(embeddings())
    assert cap[""].weights.shape == (1, 6, 6)
    assert_close(cap[""].head(0).context, out.detach())
    causal = CausalAttention(3, 2, 6, 0.0)
    with capture(causal) as cap:
        causal(embeddings()[None])
    assert cap[""].weights.shape == (1, 1, 6, 6) and cap[""].causal


def test_nested_captures_restore_the_outer_one():
    module = MultiHeadAttention(8, 8, 16, 0.0, 2)
    x = torch.randn(4, 8)
    with capture(module) as outer:
        with capture(module) as inner:
            module(x)
        module(x)
    assert len(inner.calls("")) == 1 and len(outer.calls("")) == 1


def test_model_without_attention_is_an_error():
    with pytest.raises(ValueError, match="Linear contains no attention module"):
        with capture(torch.nn.Linear(2, 2)):
            pass


def test_capture_projections_matches_the_v1_module():
    torch.manual_seed(123)
    v1 = SelfAttentionV1(3, 2)
    record = capture_projections(embeddings(), 2, seed=123)
    assert record.weights.shape == (1, 6, 6)
    assert_close(record.head(0).context, v1(embeddings()).detach())
    assert_close(record.head(0).query, (embeddings() @ v1.W_query).detach())


def test_capture_projections_per_head_unscaled_and_causal():
    record = capture_projections(embeddings(), 4, seed=7, num_heads=2, causal=True, scaled=False)
    assert record.weights.shape == (2, 6, 6) and record.scale == 1.0
    assert_close(record.weights[1], torch.softmax(record.scores[1].masked_fill(~causal_mask(6, 6), -math.inf), -1))
    with pytest.raises(ValueError, match=r"d_out \(3\) must be divisible by num_heads \(2\)"):
        capture_projections(embeddings(), 3, num_heads=2)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_capture_projections_agrees_with_the_walkthrough(scaled, causal):
    from selfattention.walkthrough import random_projections, walk

    x = embeddings()
    want = walk(list(range(6)), x, projections=random_projections(3, 4, 5), scaled=scaled, causal=causal)
    got = capture_projections(x, 4, seed=5, scaled=scaled, causal=causal).head(0)
    for ours, theirs in (("query", "queries"), ("key", "keys"), ("value", "values")):
        assert_close(getattr(got, ours), getattr(want, theirs))
    assert_close(got.scores, want.scores)
    assert_close(got.weights, want.weights)
    assert_close(got.context, want.context)


def test_recording_leaves_gradients_unchanged():
    torch.manual_seed(2)
    module = MultiHeadAttention(8, 8, 16, 0.0, 4, num_kv_heads=2, qkv_bias=True)
    x = torch.randn(2, 5, 8)
    module(x).square().sum().backward()
    plain = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    with capture(module):
        module(x).square().sum().backward()
    for name, p in module.named_parameters():
        assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)
