"""The Llama model on random weights: padding, the KV cache, positions, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfattention.generate import generate
from selfattention.kv_cache import rotate_half
from selfattention.models.llama import Llama, LlamaConfig, RMSNorm, SwiGLU

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Llama:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    values = {"vocab_size": 13, "context_length": 24, "emb_dim": 16, "num_layers": 2, "num_heads": 4}
    values |= {"num_kv_heads": 2, "hidden_dim": 24, "rope_base": 100.0, **overrides}
    model = Llama(LlamaConfig(**values)).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def test_padded_rows_give_the_logits_of_the_rows_alone() -> None:
    model = tiny()
    rows = [[3, 1, 4, 1, 5, 9], [2, 6, 5], [12]]
    alone = [model(torch.tensor([row]))[0][0] for row in rows]
    for side in ("right", "left"):
        ids = torch.zeros(3, 6, dtype=torch.long)
        mask = torch.zeros(3, 6, dtype=torch.bool)
        for index, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(6 - len(row), 6)
            ids[index, span], mask[index, span] = torch.tensor(row), True
        logits = model(ids, attention_mask=mask)[0]
        assert torch.isfinite(logits).all()
        for index, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(6 - len(row), 6)
            torch.testing.assert_close(logits[index, span], alone[index], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward() -> None:
    model = tiny()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    full = model(ids)[0]
    caches = model.make_kv_caches(2, 8)
    steps = [model(ids[:, :3], kv_caches=caches)[0]] + [
        model(ids[:, t : t + 1], kv_caches=caches)[0] for t in range(3, 8)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 3, 6, 9])
def test_logits_to_keep_gives_the_last_positions_of_the_full_logits(keep: int) -> None:
    model = tiny()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    full = model(ids, attention_mask=mask)[0]
    kept = model(ids, attention_mask=mask, logits_to_keep=keep)[0]
    assert kept.shape == (2, min(keep, 6), 13)  # 9 asks for more positions than there are: all 6
    # The same rows of the same product; one row goes through a matrix-vector kernel that sums in another
    # order than the matrix-matrix one: a few float32 ulps (rtol 1e-6 is 8 of them), not equal bits
    torch.testing.assert_close(kept, full[:, -keep:], atol=2e-6, rtol=1e-6)
    assert torch.equal(model(ids, attention_mask=mask, logits_to_keep=0)[0], full)  # 0: every position


@torch.no_grad()
def test_cached_decoding_with_left_padding() -> None:
    model = tiny()
    ids = torch.tensor([[0, 0, 3, 1, 4], [2, 7, 1, 8, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    new = torch.tensor([[5], [6]])
    full = model(torch.cat([ids, new], 1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1))[0]
    caches = model.make_kv_caches(2, 6)
    model(ids, attention_mask=mask, kv_caches=caches)
    step = model(new, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1), kv_caches=caches)[0]
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)


def test_greedy_generation_is_the_same_with_and_without_cache() -> None:
    model = tiny()
    prompt = torch.tensor([[3, 1, 4]])
    cached = generate(model, prompt, 12, temperature=0.0)
    uncached = generate(model, prompt, 12, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (1, 15)


def test_positions_matter() -> None:
    """RoPE: the same tokens in another order give other logits for the last token (a plain bag would not)."""
    model = tiny()
    with torch.no_grad():
        a = model(torch.tensor([[3, 1, 4, 7]]))[0][0, -1]
        b = model(torch.tensor([[1, 3, 4, 7]]))[0][0, -1]
    assert (a - b).abs().max() > 1e-3


def test_tied_and_untied_heads() -> None:
    model = tiny()
    assert model.out_head.weight is model.tok_emb.weight
    untied = tiny(tie_embeddings=False)
    assert untied.out_head.weight is not untied.tok_emb.weight


def test_errors_name_the_values() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 13\), got \[0, 13\]"):
        model(torch.tensor([[0, 13]]))
    with pytest.raises(ValueError, match=r"25 tokens \(0 cached \+ 25 new\) exceed the model's context_length=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask \(1, 2\) must be"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 2))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"logits_to_keep must be an integer >= 0 .*, got {bad}"):
            model(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=bad)
    with pytest.raises(ValueError, match="must be divisible"):
        LlamaConfig(vocab_size=4, emb_dim=16, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 5, 16), (3, 16)])
def test_rms_norm_is_torchs_bit_for_bit_with_the_same_gradients(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    ours, torchs = RMSNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        torchs.weight.copy_(ours.weight)
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 20).requires_grad_()
    x_torch = x.detach().clone().requires_grad_()
    out = ours(x)
    assert torch.equal(out, torchs(x_torch))
    grad = torch.randn(shape)
    out.backward(grad)
    torchs(x_torch).backward(grad)
    torch.testing.assert_close(x.grad, x_torch.grad)
    torch.testing.assert_close(ours.weight.grad, torchs.weight.grad)


def test_rotate_half_is_the_concatenated_formula_bit_for_bit_with_the_same_gradients() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 7, 8, requires_grad=True)
    cos, sin = torch.randn(2, 1, 7, 8), torch.randn(2, 1, 7, 8)
    first, second = x.chunk(2, dim=-1)
    expected = x * cos + torch.cat([-second, first], dim=-1) * sin  # the textbook "rotate half" RoPE
    out = rotate_half(x, cos, sin)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, want)


def test_swiglu_in_place_product_keeps_the_values_and_gradients() -> None:
    torch.manual_seed(3)
    mlp = SwiGLU(8, 12)
    x = torch.randn(2, 5, 8, requires_grad=True)
    expected = mlp.down(nn.functional.silu(mlp.gate(x)) * mlp.up(x))
    out = mlp(x)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *mlp.parameters()], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_in_half_precision_is_torchs_computed_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    ours, torchs = RMSNorm(576, eps=1e-5), nn.RMSNorm(576, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        torchs.weight.copy_(ours.weight)
    ours, torchs = ours.to(dtype), torchs.to(dtype)
    x = (torch.randn(3, 576) * 20).to(dtype)  # squares summed in float16 would reach inf
    out = ours(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, torchs(x))


def test_rotate_half_with_a_sin_table_wider_than_the_input_broadcasts() -> None:
    torch.manual_seed(5)
    x, cos, sin = torch.randn(2, 1, 7, 8), torch.randn(7, 8), torch.randn(2, 3, 7, 8)
    first, second = x.chunk(2, dim=-1)
    assert torch.equal(rotate_half(x, cos, sin), x * cos + torch.cat([-second, first], dim=-1) * sin)
