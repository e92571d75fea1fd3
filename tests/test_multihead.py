"""MultiHeadAttention: a float64 reference from the math core, PyTorch interop, grouped-query heads,
padding, dropout, the KV cache, the position hook, backend choice and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import counts, spy_on_backends
from selfattention import KVCache, MultiHeadAttention, capture, checks
from selfattention.functional import attention_scores, attention_weights, causal_mask, context_vectors
from selfattention.kv_cache import RollingKVCache
from selfattention.strategies import LocalAttention


def reference(module: MultiHeadAttention, x, key_padding_mask=None, attn_mask=None, *, with_weights=False):
    """The module's computation in float64 from the math core's steps, heads written out.

    ``attn_mask``: boolean (both it and the padding must allow) or float (added to the scaled scores).
    Returns the output, or ``(output, weights)`` with ``with_weights``.
    """
    p = {name: t.detach().double() for name, t in module.named_parameters()}
    x = x.double()
    batch, num_tokens, _ = x.shape
    heads, kv_heads, width = module.num_heads, module.num_kv_heads, module.head_dim

    def project(name, n):
        out = F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
        return out.view(batch, num_tokens, n, width).transpose(1, 2)

    q, k, v = project("W_query", heads), project("W_key", kv_heads), project("W_value", kv_heads)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    mask = torch.ones(batch, 1, num_tokens, num_tokens, dtype=torch.bool)
    if module.causal:
        mask = mask & causal_mask(num_tokens, num_tokens)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        mask = mask & attn_mask
    elif attn_mask is not None:  # a float mask: -inf where the boolean masks forbid, plus the bias
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf) + attn_mask.double()
    scale = 1 / math.sqrt(width) if module.scale is None else module.scale
    weights = attention_weights(attention_scores(q, k), mask=mask, scale=scale)
    merged = context_vectors(weights, v).transpose(1, 2).reshape(batch, num_tokens, module.d_out)
    out = F.linear(merged, p["out_proj.weight"], p.get("out_proj.bias"))
    return (out, weights) if with_weights else out


def projections(module: MultiHeadAttention, x):
    """Q ``(B, H, T, D)``, K and V ``(B, G, T, D)`` as the module's attention sees them (no cache, no hook)."""
    batch, num_tokens, _ = x.shape

    def heads(linear, n):
        return linear(x).view(batch, num_tokens, n, module.head_dim).transpose(1, 2)

    return (
        heads(module.W_query, module.num_heads),
        heads(module.W_key, module.num_kv_heads),
        heads(module.W_value, module.num_kv_heads),
    )


def make(seed=0, d_in=12, d_out=12, heads=4, dropout=0.0, **kwargs):
    torch.manual_seed(seed)
    return MultiHeadAttention(d_in, d_out, 16, dropout, heads, **kwargs).eval()


def test_parameters_in_chapter_order_and_shapes():
    module = make(qkv_bias=True, num_kv_heads=2)
    names = [name for name, _ in module.named_parameters()]
    assert names == [f"{n}.{p}" for n in ("W_query", "W_key", "W_value", "out_proj") for p in ("weight", "bias")]
    assert module.W_key.weight.shape == (6, 12)  # 2 kv heads of width 3
    assert "num_heads=4, num_kv_heads=2, head_dim=3, context_length=16" in repr(module)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("backend", ["auto", "math", "sdpa"])
def test_equals_float64_reference(causal, qkv_bias, kv_heads, backend):
    module = make(causal=causal, qkv_bias=qkv_bias, num_kv_heads=kv_heads, backend=backend, d_in=10)
    x = torch.randn(3, 7, 10)
    assert_close(module(x).double(), reference(module, x), atol=2e-6, rtol=1e-5)


def test_unbatched_input_equals_batch_of_one():
    module = make()
    x = torch.randn(5, 12)
    assert module(x).shape == (5, 12)
    assert_close(module(x), module(x[None])[0])


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_equals_full_heads_with_repeated_keys(kv_heads):
    grouped = make(num_kv_heads=kv_heads, qkv_bias=True)
    full = make(seed=9, qkv_bias=True)
    repeat = 4 // kv_heads
    with torch.no_grad():
        full.W_query.load_state_dict(grouped.W_query.state_dict())
        full.out_proj.load_state_dict(grouped.out_proj.state_dict())
        for name in ("W_key", "W_value"):
            src, dst = getattr(grouped, name), getattr(full, name)
            # (G * D, C) -> (G, D, C) -> (H, D, C) -> (H * D, C): each key/value head serves `repeat` queries
            dst.weight.copy_(src.weight.view(kv_heads, 3, 12).repeat_interleave(repeat, 0).reshape(12, 12))
            dst.bias.copy_(src.bias.view(kv_heads, 3).repeat_interleave(repeat, 0).reshape(12))
    x = torch.randn(2, 6, 12)
    assert_close(grouped(x), full(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_from_torch_matches_torch(bias, padding):
    torch.manual_seed(10)
    theirs = torch.nn.MultiheadAttention(12, 4, bias=bias, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(theirs)
    x = torch.randn(3, 6, 12)
    keep = torch.ones(3, 6, dtype=torch.bool)
    if padding:
        keep[1, 4:] = False
        keep[2, 2:] = False
    want, _ = theirs(x, x, x, key_padding_mask=~keep if padding else None, need_weights=False)
    got = ours(x, key_padding_mask=keep if padding else None)
    assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("out_bias", [False, True])
def test_to_torch_matches_ours(qkv_bias, out_bias):
    ours = make(causal=True, qkv_bias=qkv_bias, out_bias=out_bias)
    theirs = ours.to_torch()
    assert theirs.batch_first and not theirs.training
    x = torch.randn(2, 6, 12)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 5:] = False
    future = ~causal_mask(6, 6)  # PyTorch: True = ignore
    want, _ = theirs(x, x, x, attn_mask=future, key_padding_mask=~keep, need_weights=False)
    assert_close(ours(x, key_padding_mask=keep), want, atol=1e-6, rtol=1e-5)
    back = MultiHeadAttention.from_torch(theirs, causal=True)
    assert_close(back(x), ours(x), atol=1e-6, rtol=1e-5)


def test_interop_rejects_what_the_other_side_lacks():
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        make(num_kv_heads=2).to_torch()
    with pytest.raises(ValueError, match="d_in=10, d_out=12"):
        make(d_in=10).to_torch()
    with pytest.raises(ValueError, match="kdim=5"):
        MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(12, 4, kdim=5, vdim=5))
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(12, 4, add_bias_kv=True))


@pytest.mark.parametrize("causal", [True, False])
def test_padded_row_equals_the_sequence_alone(causal):
    module = make(causal=causal)
    short, long = torch.randn(4, 12), torch.randn(6, 12)
    batch = torch.stack([torch.cat([short, torch.randn(2, 12)]), long])
    keep = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = module(batch, key_padding_mask=keep)
    assert_close(out[0, :4], module(short), atol=1e-6, rtol=1e-5)
    assert_close(out[1], module(long), atol=1e-6, rtol=1e-5)


def test_eval_is_deterministic_and_equals_no_dropout():
    with_dropout = make(dropout=0.3)
    without = make()
    x = torch.randn(2, 6, 12)
    assert torch.equal(with_dropout(x), with_dropout(x))
    assert_close(with_dropout(x), without(x))


def test_training_dropout_is_reproducible_and_keeps_about_1_minus_p():
    torch.manual_seed(0)
    p = 0.25
    module = MultiHeadAttention(16, 16, 64, p, 4, causal=False).train()
    x = torch.randn(4, 64, 16)
    torch.manual_seed(11)
    out1, weights1 = module(x, return_weights=True)
    torch.manual_seed(11)
    out2, weights2 = module(x, return_weights=True)
    assert torch.equal(out1, out2) and torch.equal(weights1, weights2)
    kept = float((weights1 > 0).float().mean())  # every weight is positive before dropout (no mask)
    # 65536 Bernoulli(0.75) draws: standard deviation 0.0017, so 0.01 is about six of them
    assert abs(kept - (1 - p)) < 0.01
    # survivors are scaled by 1/(1-p)
    _, plain = module.eval()(x, return_weights=True)
    survivors = weights1 > 0
    assert_close(weights1[survivors], plain[survivors] / (1 - p))


def test_gradients_reach_every_weight():
    module = make(qkv_bias=True, num_kv_heads=2).train()
    module(torch.randn(2, 6, 12)).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_kv_cache_decoding_equals_the_full_pass(kv_heads):
    module = make(num_kv_heads=kv_heads)
    x = torch.randn(2, 9, 12)
    full = module(x)
    cache = module.make_kv_cache(2)
    assert cache.keys.shape == (2, kv_heads, 16, 3)
    with torch.no_grad():
        steps = [module(x[:, :5], kv_cache=cache)]  # a prompt of 5 tokens, then one token at a time
        steps += [module(x[:, t : t + 1], kv_cache=cache) for t in range(5, 9)]
    assert cache.length == 9
    assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)
    cache.reset()
    assert cache.length == 0


def test_kv_cache_errors():
    cache = KVCache(1, 2, 4, 3)
    with pytest.raises(ValueError, match=r"does not fit a cache of shape \(1, 2, 4, 3\)"):
        cache.update(torch.ones(1, 1, 2, 3), torch.ones(1, 1, 2, 3))
    cache.update(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError, match="3 cached \\+ 2 new positions exceed max_len=4"):
        cache.update(torch.ones(1, 2, 2, 3), torch.ones(1, 2, 2, 3))
    module = make()
    cache = module.make_kv_cache(1, 40)
    with torch.no_grad():
        module(torch.randn(1, 10, 12), kv_cache=cache)
        with pytest.raises(ValueError, match=r"17 tokens \(10 cached \+ 7 new\) exceed context_length=16"):
            module(torch.randn(1, 7, 12), kv_cache=cache)


REFUSED_CALLS = {
    "padding mask of the wrong length": lambda x: {"key_padding_mask": torch.ones(2, 3, dtype=torch.bool)},
    "attn_mask of the wrong shape": lambda x: {"attn_mask": torch.ones(5, 5, dtype=torch.bool)},
    "a NaN in the input": lambda x: {
        "x": x.clone().index_put_((torch.tensor(1), torch.tensor(0)), torch.tensor(float("nan")))
    },
    "scores that overflow": lambda x: {"x": x * 1e20},
}


@pytest.mark.parametrize("refused", list(REFUSED_CALLS))
def test_a_refused_call_leaves_the_kv_cache_as_it_was(refused):
    """Validate first, then write: a refused call neither advances the cache nor leaves its keys in it."""
    module = make(num_kv_heads=2)
    x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(3))
    full = module(x)
    cache = module.make_kv_cache(2)
    with torch.no_grad():
        first = module(x[:, :4], kv_cache=cache)
        kept = cache.keys[:, :, :4].clone(), cache.values[:, :, :4].clone()
        call = {"x": x[:, 4:6]} | REFUSED_CALLS[refused](x[:, 4:6])
        with pytest.raises(ValueError):
            module(call.pop("x"), kv_cache=cache, **call)
        assert cache.length == 4
        assert_close(cache.keys[:, :, :4], kept[0], atol=0, rtol=0)
        assert_close(cache.values[:, :, :4], kept[1], atol=0, rtol=0)
        rest = module(x[:, 4:9], kv_cache=cache)  # the next correct call matches the full pass
    assert cache.length == 9
    assert_close(torch.cat([first, rest], dim=1), full, atol=1e-6, rtol=1e-5)


def rotate(q, k, start):
    """A rotary embedding of the usual form, for the hook test."""

    def apply(t):
        half = t.shape[-1] // 2
        positions = torch.arange(start, start + t.shape[-2], dtype=t.dtype)[:, None]
        angles = positions / 100.0 ** (torch.arange(half, dtype=t.dtype) / half)
        cos, sin = angles.cos(), angles.sin()
        a, b = t[..., :half], t[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    return apply(q), apply(k)


def test_position_hook_sees_positions_and_agrees_with_the_cache():
    module = make(d_out=16, heads=4)
    x = torch.randn(1, 6, 12)
    full = module(x, rope=rotate)
    assert not torch.allclose(full, module(x))
    cache = module.make_kv_cache(1)
    with torch.no_grad():
        steps = [module(x[:, :3], kv_cache=cache, rope=rotate)]
        steps += [module(x[:, t : t + 1], kv_cache=cache, rope=rotate) for t in range(3, 6)]
    assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)


def test_auto_uses_the_fused_kernel_unless_it_must_not(monkeypatch):
    seen = spy_on_backends(monkeypatch)
    module = make(dropout=0.1)
    x = torch.randn(2, 6, 12)
    module.eval()(x)
    assert counts(seen) == {"sdpa": 1}
    module.train()(x)  # dropout in training: applied to the explicit weights
    assert counts(seen) == {"sdpa": 1, "math": 1}
    module.eval()(x, return_weights=True)
    assert counts(seen) == {"sdpa": 1, "math": 2}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_out": 10, "heads": 4}, r"d_out \(10\) must be divisible by num_heads \(4\)"),
        ({"num_kv_heads": 3}, r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
        ({"backend": "fast"}, "unknown backend 'fast'"),
        ({"scale": float("nan")}, r"scale must be a finite number \(or None for 1/sqrt\(D\)\), got nan"),
    ],
)
def test_constructor_errors_name_the_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_forward_errors_name_the_values():
    module = make()
    with pytest.raises(ValueError, match=r"input width \(10\) must equal d_in \(12\)"):
        module(torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match="17 tokens exceed context_length=16"):
        module(torch.randn(17, 12))
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(2, 4\) must be \(batch, keys\) = \(2, 5\)"):
        module(torch.randn(2, 5, 12), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"must be a boolean tensor \(True = may attend\), got torch.float32$"):
        module(torch.randn(2, 5, 12), key_padding_mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match=r"must be a boolean tensor \(True = may attend\), got list$"):
        module(torch.randn(2, 5, 12), key_padding_mask=[[True] * 5] * 2)
    # a mask of one dimension is for unbatched input only
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(5,\) must be \(batch, keys\) = \(1, 5\)"):
        module(torch.randn(1, 5, 12), key_padding_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^input must be \(B, T, d_in\) or \(T, d_in\), got shape \(1, 2, 5, 12\)$"):
        module(torch.randn(1, 2, 5, 12))
    # an unbatched call's scores are (H, T, S): the error names them so
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 5, 5\) does not broadcast to the scores \(4, 5, 5\)$"):
        module(torch.randn(5, 12), attn_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout probability must be in"):
        MultiHeadAttention(12, 12, 16, 1.0, 4)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    vocab, width, length = 11, 32, 12

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.position = torch.nn.Parameter(torch.randn(length, width) * 0.1)
            self.attention = MultiHeadAttention(width, width, length, 0.0, 4, num_kv_heads=2)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, tokens):
            x = self.embed(tokens) + self.position[: tokens.shape[1]]
            return self.head(x + self.attention(x))

    model = Tiny()
    tokens = torch.randint(0, vocab, (4, length + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).reshape(-1, vocab), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_kv_cache_with_left_padding_equals_the_full_pass_and_the_row_alone():
    module = make()
    x = torch.randn(2, 7, 12)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, :2] = False  # row 0: two padding tokens on the left, then 5 real ones
    full = module(x, key_padding_mask=keep)
    cache = module.make_kv_cache(2)
    with torch.no_grad():
        steps = [module(x[:, :4], kv_cache=cache, key_padding_mask=keep[:, :4])]
        steps += [module(x[:, t : t + 1], kv_cache=cache, key_padding_mask=keep[:, : t + 1]) for t in range(4, 7)]
    assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)
    assert_close(full[0, 2:], module(x[0, 2:]), atol=1e-6, rtol=1e-5)


def test_from_torch_sequence_first_layout():
    torch.manual_seed(12)
    theirs = torch.nn.MultiheadAttention(8, 2).eval()  # batch_first=False: (T, B, C)
    x = torch.randn(3, 5, 8)
    want, _ = theirs(*(x.transpose(0, 1),) * 3, need_weights=False)
    assert_close(MultiHeadAttention.from_torch(theirs)(x), want.transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_from_torch_keeps_dropout_and_training_mode():
    theirs = torch.nn.MultiheadAttention(8, 2, dropout=0.25)
    ours = MultiHeadAttention.from_torch(theirs)
    assert ours.dropout == 0.25 and ours.training and not ours.causal
    assert ours.to_torch().dropout == 0.25


@pytest.mark.parametrize("backend", ["auto", "loop", "math", "sdpa", "tiled"])
@pytest.mark.parametrize("causal", [True, False])
def test_scale_and_causal_reach_the_output_and_the_weights_on_every_backend(backend, causal):
    module = make(causal=causal, backend=backend, scale=0.3, num_kv_heads=2)  # 1/sqrt(D) would be 0.577
    x = torch.randn(2, 6, 12)
    want, want_weights = reference(module, x, with_weights=True)
    assert_close(module(x).double(), want, atol=2e-6, rtol=1e-5)
    out, weights = module(x, return_weights=True)
    assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    assert_close(weights.double(), want_weights, atol=1e-6, rtol=1e-5)


def test_weights_come_from_the_named_backend_when_it_can_return_them(monkeypatch):
    seen = spy_on_backends(monkeypatch)
    x = torch.randn(2, 6, 12)
    make(backend="loop")(x, return_weights=True)
    assert counts(seen) == {"loop": 1}
    for fused in ("sdpa", "tiled"):  # these return no weights: the math backend computes them
        make(backend=fused)(x, return_weights=True)
    assert counts(seen) == {"loop": 1, "math": 2}
    make(backend="math")(x)  # a named backend is used without weights too
    assert counts(seen) == {"loop": 1, "math": 3}


def allowed_pairs(*shape: int, seed: int = 5) -> torch.Tensor:
    """A random boolean mask (True = may attend) that always allows the diagonal."""
    drawn = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    return drawn | torch.eye(shape[-2], shape[-1], dtype=torch.bool)


@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_capture_keeps_the_backend_and_records_what_it_computed(monkeypatch, backend, scale):
    """In eval a capture runs the module's own backend, keeps the log-sum-exp and recomputes exact weights."""
    module = make(backend=backend, scale=scale, num_kv_heads=2)  # 4 heads of width 3, 2 key/value heads
    x = torch.randn(2, 5, 12)
    mask = allowed_pairs(2, 4, 5, 5)
    plain = module(x, attn_mask=mask)
    seen = spy_on_backends(monkeypatch)
    with capture(module) as cap:
        out = module(x, attn_mask=mask)
    assert counts(seen) == {"sdpa" if backend == "auto" else "math": 1}
    assert_close(out, plain, atol=1e-6, rtol=1e-5)
    record = cap[""]
    for got, want in zip((record.query, record.key, record.value), projections(module, x), strict=True):
        assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert record.scale == (1.0 / math.sqrt(3) if scale is None else scale)
    assert record.causal is True and record.mask is not None and torch.equal(record.mask, mask)
    assert record.lse is not None and record.stored_weights is None  # the weights are recomputed on request
    _, want_weights = reference(module, x, attn_mask=mask, with_weights=True)
    assert_close(record.weights.double(), want_weights, atol=1e-6, rtol=1e-5)


def test_capture_of_weights_after_dropout_records_what_the_call_used():
    """In training with dropout (and with return_weights) the eager path runs and its weights are kept."""
    module = make(dropout=0.25, num_kv_heads=2).train()
    x = torch.randn(2, 5, 12)
    mask = allowed_pairs(2, 4, 5, 5)
    torch.manual_seed(7)
    _, want_weights = module(x, attn_mask=mask, return_weights=True)
    _, _, v = projections(module, x)
    want_context = context_vectors(want_weights, v.repeat_interleave(2, dim=1))  # (B, H, T, D)
    for return_weights in (False, True):
        with capture(module) as cap:
            torch.manual_seed(7)
            result = module(x, attn_mask=mask, return_weights=return_weights)
        record = cap[""]
        if return_weights:
            assert torch.equal(result[1], want_weights)
        for got, want in zip((record.query, record.key, record.value), projections(module, x), strict=True):
            assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert record.scale == 1.0 / math.sqrt(3)
        assert record.causal is True and record.mask is not None and torch.equal(record.mask, mask)
        assert record.lse is None and record.stored_weights is not None
        assert torch.equal(record.stored_weights, want_weights)  # the same seed: the same weights dropped
        assert_close(record.context, want_context, atol=1e-6, rtol=1e-5)


def test_each_call_checks_its_inputs_once_and_decoding_does_not_rescan_the_cache(monkeypatch):
    """The module measures q, k, v once; attention and the cache reuse those bounds instead of reading again."""
    scanned: list[dict[str, tuple[int, ...]]] = []
    measure = checks.largest_finite

    def counted(**tensors):
        scanned.append({name: tuple(t.shape) for name, t in tensors.items()})
        return measure(**tensors)

    monkeypatch.setattr(checks, "largest_finite", counted)
    module = make(num_kv_heads=2)
    x = torch.randn(2, 6, 12)
    module(x)
    module(x, return_weights=True)
    with capture(module):
        module(x)
    new = {"query": (2, 4, 6, 3), "key": (2, 2, 6, 3), "value": (2, 2, 6, 3)}
    assert scanned == [new] * 3
    scanned.clear()
    cache = module.make_kv_cache(2)
    with torch.no_grad():
        module(x, kv_cache=cache)
        module(x[:, :1], kv_cache=cache)  # reads 7 cached keys, measures only the new token
    assert scanned == [new, {"query": (2, 4, 1, 3), "key": (2, 2, 1, 3), "value": (2, 2, 1, 3)}]


def test_the_smallest_sizes_are_valid():
    one_head = make(heads=1)
    x = torch.randn(2, 5, 12)
    assert_close(one_head(x).double(), reference(one_head, x), atol=2e-6, rtol=1e-5)
    one_position = MultiHeadAttention(12, 12, 1, 0.0, 4)
    assert one_position(torch.randn(1, 12)).shape == (1, 12)
    with pytest.raises(ValueError, match=r"^context_length must be at least 1 or None, got 0$"):
        MultiHeadAttention(12, 12, 0, 0.0, 4)


def test_by_default_only_the_output_projection_has_a_bias():
    module = MultiHeadAttention(12, 12, 16, 0.0, 4, num_kv_heads=2)
    names = [name for name, _ in module.named_parameters()]
    assert names == ["W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight", "out_proj.bias"]


def test_parameters_and_the_cache_follow_the_given_dtype_and_device():
    torch.manual_seed(0)
    double = MultiHeadAttention(12, 12, 16, 0.0, 4, qkv_bias=True, num_kv_heads=2, dtype=torch.float64).eval()
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    assert_close(double(x), reference(double, x), atol=1e-12, rtol=1e-12)
    meta = MultiHeadAttention(12, 12, 16, 0.0, 4, qkv_bias=True, num_kv_heads=2, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    # the cache takes the dtype and device of the weights unless told otherwise
    assert double.make_kv_cache(1).keys.dtype == torch.float64
    assert double.make_kv_cache(1, dtype=torch.float32).keys.dtype == torch.float32
    assert meta.make_kv_cache(1).keys.is_meta
    assert meta.make_kv_cache(1, device="cpu").keys.device.type == "cpu"


def test_make_kv_cache_takes_max_len_or_the_context_length():
    module = make()
    assert module.make_kv_cache(2).keys.shape == (2, 4, 16, 3)
    assert module.make_kv_cache(2, 5).keys.shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match=r"^max_len is required when the module has no context_length$"):
        MultiHeadAttention(12, 12, None, 0.0, 4).make_kv_cache(1)


def test_from_torch_passes_on_context_length_and_backend(monkeypatch):
    ours = MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2), context_length=4, backend="math").eval()
    with pytest.raises(ValueError, match="5 tokens exceed context_length=4"):
        ours(torch.randn(5, 8))
    seen = spy_on_backends(monkeypatch)
    ours(torch.randn(4, 8))
    assert counts(seen) == {"math": 1}


class RecordingStrategy:
    """A strategy that records each check it is asked for, then attends in this process."""

    def __init__(self) -> None:
        self.checked: list[tuple[float, dict[str, object]]] = []

    def check_call(self, *, dropout, unsupported):
        self.checked.append((dropout, unsupported))

    def attend(self, module, query, key, value, **kwargs):
        return LocalAttention().attend(module, query, key, value, **kwargs)


def test_the_strategy_checks_each_call_with_its_dropout_and_features_then_attends():
    strategy = RecordingStrategy()
    module = make(dropout=0.25, context_parallel=strategy)
    assert module.strategy is strategy
    x = torch.randn(2, 5, 12)
    assert_close(module(x), make(dropout=0.25)(x))  # the same seed: the same weights
    keep = torch.ones(2, 5, dtype=torch.bool)
    module.train()(x, key_padding_mask=keep, return_weights=True)
    names = {"kv_cache", "key_padding_mask", "attn_mask", "rope", "return_weights", "capture"}
    (eval_dropout, eval_features), (train_dropout, train_features) = strategy.checked
    assert (eval_dropout, train_dropout) == (0.0, 0.25)
    assert set(eval_features) == set(train_features) == names
    assert all(eval_features[name] in (None, False) for name in names)
    assert train_features["key_padding_mask"] is keep and train_features["return_weights"] is True


def test_unbatched_input_takes_a_one_dimensional_padding_mask_and_an_attn_mask():
    module = make(causal=False)
    x = torch.randn(6, 12)
    keep = torch.tensor([True] * 4 + [False] * 2)
    mask = allowed_pairs(6, 6)
    assert_close(
        module(x, key_padding_mask=keep).double(), reference(module, x[None], keep[None])[0], atol=2e-6, rtol=1e-5
    )
    want = reference(module, x[None], keep[None], mask)[0]
    assert_close(module(x, key_padding_mask=keep, attn_mask=mask).double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_and_padding_mask_both_apply(kind):
    module = make(causal=False)
    x = torch.randn(2, 6, 12)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    if kind == "bool":
        mask = allowed_pairs(2, 4, 6, 6)
    else:  # a float mask is added to the scaled scores; the padding still forbids
        mask = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    want = reference(module, x, keep, mask)
    assert_close(module(x, key_padding_mask=keep, attn_mask=mask).double(), want, atol=2e-6, rtol=1e-5)


def test_a_rolling_cache_takes_a_padding_mask_over_the_keys_it_keeps():
    module = make(num_kv_heads=2)
    x = torch.randn(1, 5, 12)
    plain, masked = (RollingKVCache(1, 2, 3, window=4) for _ in range(2))
    with torch.no_grad():
        module(x[:, :3], kv_cache=plain)
        module(x[:, :3], kv_cache=masked)
        want = module(x[:, 3:], kv_cache=plain)  # 3 cached + 2 new: the oldest is evicted, 4 keys are kept
        with pytest.raises(ValueError, match=r"must be \(batch, keys\) = \(1, 4\)"):
            module(x[:, 3:], kv_cache=masked, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
        got = module(x[:, 3:], kv_cache=masked, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    assert_close(got, want, atol=0, rtol=0)
