"""The GPT model: shapes, loss, positions, and a KV cache that changes nothing but the speed."""

from __future__ import annotations

import math

import pytest
import torch

from selfattention.generate import generate, sample_next
from selfattention.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    values = {"vocab_size": 11, "context_length": 24, "emb_dim": 16, "num_layers": 2, "num_heads": 4}
    return GPT(GPTConfig(**{**values, **overrides})).eval()


VARIANTS = [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1, "rope": True}, {"rope": True, "qkv_bias": True}]


def test_untrained_loss_is_near_log_vocab() -> None:
    model = tiny()
    gen = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(11, (2, 3, 10), generator=gen)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 11)
    assert loss is not None
    # weights of std 0.02 give nearly uniform predictions: cross-entropy close to log V against random targets
    assert abs(loss.item() - math.log(11)) < 0.1


def test_weights_are_tied_and_rope_replaces_positions() -> None:
    model = tiny()
    assert model.out_head.weight is model.tok_emb.weight
    assert model.pos_emb is not None
    rope = tiny(rope=True)
    assert rope.pos_emb is None
    assert model.num_parameters() - rope.num_parameters() == 24 * 16


def test_causal_future_tokens_do_not_change_the_past() -> None:
    model = tiny()
    idx = torch.randint(11, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 11
    torch.testing.assert_close(model(idx)[0][:, :8], model(changed)[0][:, :8])


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_cached_logits_equal_uncached(variant: dict, chunk: int | None) -> None:
    """Prompt through the cache in chunks, then token by token: every step's logits match a full pass."""
    model = tiny(**variant)
    idx = torch.randint(11, (2, 20), generator=torch.Generator().manual_seed(3))
    full = model(idx)[0]  # (B, T, V), no cache
    caches = model.make_kv_caches(2)
    prompt = 7
    size = chunk or prompt
    pieces = [model(idx[:, i : min(i + size, prompt)], kv_caches=caches)[0] for i in range(0, prompt, size)]
    pieces += [model(idx[:, t : t + 1], kv_caches=caches)[0] for t in range(prompt, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("chunk", [None, 2])
def test_greedy_generation_same_tokens_with_and_without_cache(variant: dict, chunk: int | None) -> None:
    model = tiny(**variant)
    prompt = torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    cached = generate(model, prompt, 19, temperature=0.0, use_cache=True, prefill_chunk=chunk)
    plain = generate(model, prompt, 19, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 24)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :5], prompt)


def test_sampling_is_seeded_and_top_k_limits_the_choice() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    first = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(4))
    again = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    picks = {int(sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(s))) for s in range(40)}
    assert picks == {1, 2}


def test_context_overflow_is_an_error_or_slides() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"prompt \(4 tokens\) \+ max_new_tokens \(30\) = 34 exceeds .*=24"):
        generate(model, prompt, 30)
    with pytest.raises(ValueError, match=r"30 tokens \(0 cached \+ 30 new\) exceed the model's context_length=24"):
        model(torch.zeros(1, 30, dtype=torch.long))
    for use_cache in (True, False):
        out = generate(model, prompt, 50, temperature=0.0, use_cache=use_cache, slide=True)
        assert out.shape == (1, 54)


def test_bad_configs_and_ids() -> None:
    with pytest.raises(ValueError, match=r"emb_dim \(10\) must be divisible by num_heads \(4\)"):
        GPTConfig(vocab_size=5, emb_dim=10, num_heads=4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 11\), got \[0, 12\]"):
        tiny()(torch.tensor([[0, 12]]))
    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['depth'\]"):
        GPTConfig.from_dict({"type": "gpt", "vocab_size": 3, "depth": 2})
