"""capture(): records per module and per head, agrees with the fast path, and leaves no trace when done."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from conftest import counts, spy_on_backends
from selfattention import (
    CausalAttention,
    MultiHeadAttention,
    SelfAttentionV1,
    capture,
    capture_projections,
)
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


def test_capture_keeps_the_usual_backend_and_eager_only_for_dropout(monkeypatch):
    seen = spy_on_backends(monkeypatch, lse_suffix="+lse")
    module = MultiHeadAttention(8, 8, 16, 0.5, 2).eval()
    x = torch.randn(1, 4, 8)
    with capture(module):
        module(x)
    assert counts(seen) == {"sdpa+lse": 1}  # the fused kernel, and its log-sum-exp
    module(x)
    assert counts(seen) == {"sdpa+lse": 1, "sdpa": 1}
    with capture(module.train()) as cap:
        module(x)
    assert counts(seen) == {"sdpa+lse": 1, "sdpa": 1, "math": 1}  # weights after dropout: only the eager path has them
    assert cap[""].stored_weights is not None and cap[""].lse is None
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


def test_model_without_attention_is_an_error():
    with pytest.raises(ValueError, match="Linear contains no attention module"):
        with capture(torch.nn.Linear(2, 2)):
            pass


def test_capture_projections_matches_the_v1_module():
    torch.manual_seed(123)
    v1 = SelfAttentionV1(3, 2)
    record = capture_projections(embeddings(), 2, seed=123)
    assert record.weights.shape == (1, 6, 6)
    assert record.weights.dtype == torch.float64  # computed in float64, compared at float32's precision
    assert_close(record.head(0).context.float(), v1(embeddings()).detach())
    assert_close(record.head(0).query.float(), (embeddings() @ v1.W_query).detach())


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
    # the capture runs in float64, the walk-through in the embeddings' float32: compared at float32's precision
    for ours, theirs in (("query", "queries"), ("key", "keys"), ("value", "values")):
        assert_close(getattr(got, ours).float(), getattr(want, theirs))
    assert_close(got.scores.float(), want.scores)
    assert_close(got.weights.float(), want.weights)
    assert_close(got.context.float(), want.context)


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


def _gqa_module(seed=3):
    torch.manual_seed(seed)
    return MultiHeadAttention(16, 16, 64, 0.0, 4, num_kv_heads=2, causal=True).eval()


def test_lazy_record_selections_equal_the_eager_weights():
    module = _gqa_module()
    x = torch.randn(2, 9, 16)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False
    _, eager = module(x, key_padding_mask=padding, return_weights=True)  # (B, H, T, S) from "math"
    with capture(module) as cap:
        module(x, key_padding_mask=padding)
    record = cap[""]
    assert record.stored_weights is None and record.lse is not None and record.lse.shape == (2, 4, 9)
    assert_close(record.weights, eager, atol=1e-6, rtol=0)
    assert_close(record.weights_for(heads=[3, 0], rows=(2, 7)), eager[:, [3, 0], 2:7], atol=1e-6, rtol=0)
    assert_close(record.weights_for(heads=2, rows=5), eager[:, 2:3, 5:6], atol=1e-6, rtol=0)
    expected_scores = record.query[:, [3]] @ record.key[:, [1]].mT  # head 3 reads key head 3 // 2 = 1
    assert_close(record.scores_for(heads=3), expected_scores)
    eager_context = eager[:, [1], :4] @ record.value[:, [0]]  # head 1 reads value head 0
    assert_close(record.context_for(heads=[1], rows=(0, 4)), eager_context, atol=1e-6, rtol=0)
    values, indices, rest = record.top_k(2, heads=[1])
    top = torch.topk(eager[:, [1]], 2, dim=-1)
    assert_close(values, top.values, atol=1e-6, rtol=0)
    assert_close(eager[:, [1]].gather(-1, indices), values, atol=1e-6, rtol=0)
    assert_close(rest, 1 - top.values.sum(-1), atol=1e-6, rtol=0)
    assert_close(record.head(3).weights, eager[:, 3], atol=1e-6, rtol=0)


def test_capture_of_a_decoding_step_with_folded_grouped_heads():
    # One new token with grouped heads runs with the query heads folded into rows: the lse must come back per head.
    module = _gqa_module()
    x = torch.randn(1, 6, 16)
    cache = module.make_kv_cache(1)
    with torch.no_grad():
        module(x[:, :5], kv_cache=cache)
        _, eager = module(x[:, 5:], kv_cache=cache, return_weights=True)
        cache.undo(1)
        with capture(module) as cap:
            module(x[:, 5:], kv_cache=cache)
    assert cap[""].lse.shape == (1, 4, 1)
    assert_close(cap[""].weights, eager, atol=1e-6, rtol=0)


def test_capture_output_is_the_fused_output_bit_for_bit():
    module = _gqa_module()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        fast = module(x)
        with capture(module):
            recorded = module(x)
    assert torch.equal(recorded, fast)


def test_full_weights_beyond_the_limit_name_the_size(monkeypatch):
    from selfattention import inspect

    module = _gqa_module()
    with capture(module) as cap:
        module(torch.randn(1, 8, 16))
    monkeypatch.setattr(inspect, "FULL_LIMIT", 4 * 4 * 8 * 8 - 1)  # one float short of (1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"full weights \(1, 4, 8\) x 8 keys would take 0\.0 GiB.*top_k"):
        _ = cap[""].weights
    assert cap[""].weights_for(heads=0).shape == (1, 1, 8, 8)
    with pytest.raises(IndexError, match=r"heads \[4\] out of range: the module has 4 heads"):
        cap[""].weights_for(heads=[4])
    with pytest.raises(IndexError, match=r"rows \(3, 9\) out of range"):
        cap[""].top_k(2, rows=(3, 9))


def test_record_keeps_no_per_head_square_tensor():
    module = MultiHeadAttention(8, 8, 1024, 0.0, 2, causal=True).eval()
    with torch.no_grad(), capture(module) as cap:
        module(torch.randn(1, 1024, 8))
    record = cap[""]
    kept = [record.query, record.key, record.value, record.context, record.lse]
    assert max(t.numel() for t in kept) < 1024 * 1024 // 100  # a (T, S) tensor per head would be 1024²
    assert record.top_k(4)[0].shape == (1, 2, 1024, 4)


def _padded_gqa_model() -> tuple[TwoLayers, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    model = TwoLayers().eval()
    x = torch.randn(2, 9, 8)
    allowed = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    allowed[1, ..., 6:] = False  # the second sequence is padded after 6 tokens
    return model, x, allowed


def test_capture_top_k_keeps_what_record_top_k_gives():
    """capture_top_k takes the top keys while the model runs: the same numbers as capture()'s record.top_k,
    bit for bit (the same Q, K and log-sum-exp, the same chunks), grouped heads and a padding mask included."""
    from selfattention import TopKeys, capture_top_k

    model, x, allowed = _padded_gqa_model()
    model.first.forward = lambda x, _f=model.first.forward: _f(x, attn_mask=allowed)  # pad the first layer
    with torch.no_grad():
        plain = model(x)
        with capture(model) as full:
            model(x)
        with capture_top_k(model, 3) as top:
            out = model(x)
    assert torch.equal(out, plain)  # the output is the uncaptured one
    for name in ("first", "blocks.0"):
        kept = top[name]
        assert isinstance(kept, TopKeys)
        for got, want in zip(kept.top_k(3), full[name].top_k(3), strict=True):
            assert torch.equal(got, want), name
        assert torch.equal(kept.lse, full[name].lse) and kept.scale == full[name].scale
    # a padded key has no weight (where a row has fewer than k allowed keys, the spare slots hold weight 0)
    padded = top["first"].indices[1] >= 6
    assert padded.any() and (top["first"].weights[1][padded] == 0).all()
    # fewer keys, a head, some rows: as record.top_k gives them; the rest of the mass differs only in how the
    # float32 sum was taken (1 - Σ of 2 weights against 1 - Σ of 3 weights + the third), within a few ulps
    got, want = top["first"].top_k(2, heads=[3, 1], rows=(2, 7)), full["first"].top_k(2, heads=[3, 1], rows=(2, 7))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert_close(got[2], want[2], rtol=0, atol=1e-6)
    assert got[0].shape == (2, 2, 5, 2)


def test_capture_top_k_holds_only_the_top_keys():
    """At T = 1024 the kept tensors are O(T·k) per head: nothing of size T·D (Q, K, V) nor T·S stays."""
    from selfattention import capture_top_k

    module = MultiHeadAttention(64, 64, 1024, 0.0, 2, causal=True).eval()
    with torch.no_grad(), capture_top_k(module, 4) as cap:
        module(torch.randn(1, 1024, 64))
    kept = cap[""]
    held = [kept.weights, kept.indices, kept.rest, kept.lse]
    storages = sum(t.untyped_storage().nbytes() for t in held)
    assert storages == 2 * 1024 * (4 * 4 + 4 * 8 + 4 + 4)  # weights, int64 indices, rest, lse per head and row
    assert kept.weights.shape == (1, 2, 1024, 4)


def test_capture_top_k_hands_freed_pages_back_after_each_module(monkeypatch):
    from selfattention import capture_top_k, inspect

    trims: list[int] = []
    monkeypatch.setattr(inspect, "_MALLOC_TRIM", lambda pad: trims.append(pad) or 1)
    model, x, _ = _padded_gqa_model()
    with torch.no_grad(), capture_top_k(model, 2):
        model(x)
    assert trims == [0, 0]  # once per module, all free pages


def test_capture_top_k_with_dropout_and_bad_k():
    from selfattention import capture_top_k

    torch.manual_seed(2)
    module = MultiHeadAttention(8, 8, 16, 0.5, 2).train()
    with capture_top_k(module, 3) as cap:
        module(torch.randn(1, 5, 8))
    kept = cap[""]
    assert kept.lse is None  # the eager path ran: its weights after dropout, not a log-sum-exp
    assert kept.weights.shape == (1, 2, 5, 3) and (kept.weights[..., :-1] >= kept.weights[..., 1:]).all()
    with pytest.raises(
        ValueError, match=r"k must be within 1 \.\. 3 \(the keys kept per row by capture_top_k\), got 4"
    ):
        kept.top_k(4)
    with pytest.raises(IndexError, match=r"heads \[2\] out of range: the module has 2 heads"):
        kept.top_k(1, heads=[2])
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        with capture_top_k(module, 0):
            pass
    assert module._recorder is None


@torch.no_grad()
def test_capture_of_a_rotary_model_recomputes_the_context_its_kernel_computed():
    """A Llama rotates queries and keys inside attention: the recomputed weights must be those of the rotated
    q and k, which the context that the fused kernel handed to ``out_proj`` proves (a record of the unrotated
    q and k gives other weights, and another context)."""
    from selfattention.models.llama import Llama, LlamaConfig

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=13, context_length=24, emb_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
                         hidden_dim=24, rope_base=100.0)  # fmt: skip
    model = Llama(config).eval()
    ids, padded = torch.randint(0, 13, (2, 10)), torch.ones(2, 10, dtype=torch.bool)
    padded[1, 7:] = False
    handed: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "out_proj"):
            module.out_proj.register_forward_pre_hook(lambda _m, args, n=name: handed.__setitem__(n, args[0]))
    with capture(model) as cap:
        model(ids, attention_mask=padded)
    assert set(handed) == {name for name, _ in cap.items()}
    for name, record in cap.items():
        batch, heads, tokens, width = record.context.shape
        merged = record.context.transpose(1, 2).reshape(batch, tokens, heads * width)
        torch.testing.assert_close(merged, handed[name], atol=1e-6, rtol=0)
        assert float(record.weights[1, :, :7, 7:].abs().max()) == 0.0  # padded keys


def test_an_enclosing_capture_still_records_what_an_inner_one_does():
    """detect_heads and the viewer capture inside: a capture around them must not go blind meanwhile."""
    module = MultiHeadAttention(16, 16, 32, 0.0, num_heads=4).eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4))
    with capture(module) as outer:
        with capture(module) as inner:
            module(x)
        module(x)
    assert len(inner.calls("")) == 1 and len(outer.calls("")) == 2
    assert_close(outer.calls("")[0].weights, inner[""].weights)
    assert module._recorder is None  # both gone


def test_top_k_of_stored_weights_keeps_float64():
    """The stored-weights path (return_weights, or dropout) gives the work dtype, as the recomputed one does."""
    module = MultiHeadAttention(16, 16, 32, 0.0, num_heads=4).eval().double()
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with capture(module) as stored:
        module(x, return_weights=True)
    with capture(module) as recomputed:
        module(x)
    mine, theirs = stored[""].top_k(2), recomputed[""].top_k(2)
    assert mine[0].dtype == theirs[0].dtype == torch.float64
    assert_close(mine[0], theirs[0])
