"""Generation: the top-k distribution exactly, and the uncached slide against a recomputation of its logits."""

from __future__ import annotations

import pytest
import torch

import selfattention.generate as generation
from conftest import tiny_rotary_gpt
from selfattention.generate import generate, next_token_probs, sample_next
from selfattention.kv_cache import CachePolicy
from selfattention.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides: object) -> GPT:
    torch.manual_seed(0)
    values = {"vocab_size": 11, "context_length": 12, "emb_dim": 16, "num_layers": 2, "num_heads": 4, **overrides}
    model = GPT(GPTConfig(**values)).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # weights of std 0.02 give nearly flat logits: make them depend on the context
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(25)
    return model


@pytest.mark.parametrize("k", [1, 2, 3, 7, 49, 50, 80])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_keeps_exactly_the_k_likeliest_renormalised(k: int, temperature: float) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(k), dtype=torch.float64).float() * 3
    probs = next_token_probs(logits, temperature=temperature, top_k=k)
    kept = min(k, 50)
    for row in range(4):
        top = set(torch.topk(logits[row], kept).indices.tolist())
        assert set(torch.nonzero(probs[row]).flatten().tolist()) == top  # the support, exactly
        index = torch.tensor(sorted(top))
        expected = torch.softmax(logits[row, index].double() / temperature, dim=0)
        torch.testing.assert_close(probs[row, index].double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(4))


def test_top_k_keeps_ties_with_the_kth_logit() -> None:
    probs = next_token_probs(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), top_k=2)
    assert torch.nonzero(probs[0]).flatten().tolist() == [0, 1, 2]


def test_top_k_of_one_is_greedy() -> None:
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(0)) * 2
    greedy = logits.argmax(dim=-1, keepdim=True)
    for seed in range(5):
        assert torch.equal(sample_next(logits, top_k=1, generator=torch.Generator().manual_seed(seed)), greedy)
    assert torch.equal(next_token_probs(logits, top_k=1), torch.nn.functional.one_hot(greedy[:, 0], 30).float())
    model, prompt = tiny(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    sampled = generate(model, prompt, 8, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, generate(model, prompt, 8, temperature=0.0))


@pytest.mark.parametrize(("context", "layers"), [(12, 2), (3, 1)])
@pytest.mark.parametrize("use_cache", [False, True])
def test_each_step_conditions_on_the_window_it_should(
    monkeypatch: pytest.MonkeyPatch, use_cache: bool, context: int, layers: int
) -> None:
    """Record the logits every step sampled from and recompute them from the tokens, past the context.

    Uncached: each step reads the last context_length tokens. Cached: when the cache is full, it is
    refilled from the last context_length // 2 tokens (at least 1) and then grows again one token a step.
    """
    model = tiny(context_length=context, num_layers=layers)
    seen: list[torch.Tensor] = []
    real = generation.sample_next

    def recording(logits: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(logits.clone())
        return real(logits, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(generation, "sample_next", recording)
    prompt = torch.tensor([[1, 2, 3], [5, 4, 3]])[:, -context:]
    begin = prompt.shape[1]
    generator = torch.Generator().manual_seed(0)  # sampled, not greedy: greedy falls into a loop of one token
    out = generate(model, prompt, 30, temperature=1.0, generator=generator, use_cache=use_cache, slide=True)
    assert out.shape == (2, begin + 30) and len(seen) == 30
    start = 0
    for step, logits in enumerate(seen):
        end = begin + step  # the tokens before the one this step picks
        if not use_cache:
            start = max(0, end - context)
        elif end - start > context:  # the cache was full: refilled with the last half of the context
            start = end - max(1, context // 2)
        with torch.no_grad():
            expected = model(out[:, start:end])[0][:, -1, :]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    if end - start > 1:  # the last step's window less its first token gives other logits: the check can see it
        with torch.no_grad():
            fewer = model(out[:, start + 1 : end])[0][:, -1, :]
        assert (seen[-1] - fewer).abs().max() > 1e-3


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_the_distribution_needs_a_positive_finite_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0 to sample, got {temperature}"):
        next_token_probs(torch.zeros(1, 3), temperature=temperature)


def test_distribution_errors_and_default() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, -3.0]])
    torch.testing.assert_close(next_token_probs(logits), torch.softmax(logits, dim=-1))  # temperature 1 by default
    with pytest.raises(ValueError, match=r"temperature 1e-39 is too small to sample with; use 0 for greedy"):
        next_token_probs(logits, temperature=1e-39)
    with pytest.raises(ValueError, match=r"temperature 1e-39 is too small to sample with"):
        sample_next(logits, temperature=1e-39)
    with pytest.raises(ValueError, match=r"top_k must be at least 1, got 0"):
        next_token_probs(logits, top_k=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0, got -1.0"):
        sample_next(logits, temperature=-1.0)


@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_sampling_draws_from_the_distribution_at_its_temperature(temperature: float) -> None:
    """The same generator state gives the same draws as multinomial over next_token_probs: the temperature
    and top-k reach the distribution actually sampled."""
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(5)) * 2
    for seed in range(3):
        got = sample_next(logits, temperature=temperature, top_k=8, generator=torch.Generator().manual_seed(seed))
        probs = next_token_probs(logits, temperature=temperature, top_k=8)
        assert torch.equal(got, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)))
        flat = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample_next(logits, generator=torch.Generator().manual_seed(seed)), flat)  # defaults: T=1
        assert not torch.equal(got, flat)  # a sampler that ignored temperature and top-k would be seen


def test_overflow_is_judged_row_by_row() -> None:
    """A row whose every logit overflows to -inf has no distribution (softmax would be NaN): refused, even
    beside a good row. A row where only some logits become -inf still has one, whatever the other rows do."""
    with pytest.raises(ValueError, match=r"temperature 1e-30 is too small to sample with"):
        next_token_probs(torch.tensor([[-1e10, -1e10], [1.0, 2.0]]), temperature=1e-30)
    probs = next_token_probs(torch.tensor([[-1e10, 1.0], [-1e10, 2.0]]), temperature=1e-30)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_sampling_without_a_generator_draws_from_the_global_seed() -> None:
    """``generator=None`` samples with torch's global random state: ``torch.manual_seed`` makes it repeatable."""
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(6)) * 2
    probs = next_token_probs(logits, temperature=1.5, top_k=8)
    for seed in range(3):
        torch.manual_seed(seed)
        got = sample_next(logits, temperature=1.5, top_k=8)
        torch.manual_seed(seed)
        assert torch.equal(got, torch.multinomial(probs, 1))
        assert not torch.equal(got, logits.argmax(dim=-1, keepdim=True))  # sampled, not greedy


@pytest.mark.parametrize(("slide", "positions"), [(False, 3 + 5), (True, 12)])
def test_the_caches_hold_prompt_and_output_not_the_whole_context(
    monkeypatch: pytest.MonkeyPatch, slide: bool, positions: int
) -> None:
    """Without ``slide`` a cache of ``T0 + max_new_tokens`` positions is enough (less memory than the context of
    12); with it, the cache takes the whole context. Either way the tokens are those of the uncached path."""
    model = tiny()
    made: list[list[object]] = []
    real = model.make_kv_caches

    def recording(batch_size: int, max_len: int | None = None) -> list:
        made.append(real(batch_size, max_len))
        return made[-1]

    monkeypatch.setattr(model, "make_kv_caches", recording)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompt, 5, temperature=0.0, slide=slide)
    assert [[cache.keys.shape for cache in caches] for caches in made] == [[(2, 4, positions, 4)] * 2]  # type: ignore[attr-defined]
    assert torch.equal(out, generate(model, prompt, 5, temperature=0.0, use_cache=False))


@pytest.mark.parametrize(
    ("policy", "chunk", "prompt_chunks"),
    [
        (CachePolicy("window", window=8), None, [4, 4, 3]),  # half the window at a time
        (CachePolicy("window", window=8), 3, [3, 3, 3, 2]),  # a smaller prefill_chunk is kept
        (CachePolicy("window", window=8), 6, [4, 4, 3]),  # a larger one is cut to half the window
        (CachePolicy("sinks", window=3, sinks=2), None, [1] * 11),  # half of 3 rounds down to 1
    ],
    ids=["window", "smaller-chunk", "larger-chunk", "sinks"],
)
def test_a_rolling_cache_takes_the_prompt_in_half_windows_then_one_token_a_step(
    monkeypatch: pytest.MonkeyPatch, policy: CachePolicy, chunk: int | None, prompt_chunks: list[int]
) -> None:
    """Past the context (11 + 30 > 32 tokens) without ``slide``: every step's logits equal a fresh pass over the
    tokens the cache keeps (exact for a one-layer model, see tests/test_kv_cache.py), the prompt went in chunks
    of at most half the window, and each step fed only the newest token."""
    model = tiny_rotary_gpt()
    fed: list[int] = []
    caches: list[list] = []
    steps: list[tuple[torch.Tensor, list[int]]] = []
    real_feed, real_sample = generation.feed, generation.sample_next

    def feeding(model: GPT, tokens: torch.Tensor, kv_caches: list) -> torch.Tensor:
        fed.append(tokens.shape[1])
        caches.append(kv_caches)
        return real_feed(model, tokens, kv_caches)

    def recording(logits: torch.Tensor, **kwargs: object) -> torch.Tensor:
        steps.append((logits.clone(), caches[-1][0].kept()))
        return real_sample(logits, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(generation, "feed", feeding)
    monkeypatch.setattr(generation, "sample_next", recording)
    prompt = torch.randint(13, (2, 11), generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(0)
    out = generate(model, prompt, 30, temperature=1.0, generator=generator, cache=policy, prefill_chunk=chunk)
    assert out.shape == (2, 41) and torch.equal(out[:, :11], prompt)
    assert fed == [*prompt_chunks, *[1] * 29]  # the last token is sampled, never fed
    assert len(steps) == 30 and steps[-1][1][-1] == 39  # the cache ends with the last token fed
    with torch.no_grad():
        for step, (logits, kept) in enumerate(steps):
            assert len(kept) <= policy.num_sinks + (policy.window or 0)
            fresh = model(out[:, kept])[0][:, -1, :]  # the kept tokens alone, at positions 0 .. S - 1
            torch.testing.assert_close(logits, fresh, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_a_rolling_cache_needs_use_cache() -> None:
    with pytest.raises(ValueError, match=r"^the 'window' cache policy needs use_cache=True$"):
        generate(tiny_rotary_gpt(), torch.tensor([[1, 2]]), 3, cache="window", use_cache=False)


def test_top_k_below_one_is_refused_for_greedy_decoding_too() -> None:
    with pytest.raises(ValueError, match=r"top_k must be at least 1, got 0"):
        sample_next(torch.zeros(1, 3), temperature=0.0, top_k=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    ("bad", "largest"),
    [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")],
    ids=["nan", "inf", "all -inf"],
)
def test_logits_without_a_usable_token_are_named_not_blamed_on_the_temperature(
    bad: float, largest: str, temperature: float
) -> None:
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [1.0, 2.0, 3.0]])  # -inf for some tokens is fine
    logits[1] = bad if largest == "-inf" else torch.tensor([1.0, bad, 3.0])
    with pytest.raises(ValueError, match=rf"^the logits of row 1 are not usable: largest {largest} "):
        sample_next(logits, temperature=temperature)
    assert sample_next(logits[:1], temperature=temperature).item() in (0, 1)


class Scripted(torch.nn.Module):
    """A language model whose row ``r`` says ``script[r][t]`` at step ``t`` (logits one-hot on it)."""

    def __init__(self, script: list[list[int]], prompt: int, vocab: int = 6) -> None:
        super().__init__()
        self.script, self.prompt, self.vocab = script, prompt, vocab
        self.config = GPTConfig(vocab_size=vocab, context_length=32)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits = torch.zeros(*idx.shape, self.vocab)
        for row, said in enumerate(self.script):
            logits[row, -1, said[idx.shape[1] - self.prompt]] = 1.0
        return logits, None


def test_a_row_that_has_ended_is_padded_with_the_end_token_until_every_row_has() -> None:
    model = Scripted([[2, 5, 3, 3, 3], [2, 2, 4, 5, 3], [1, 1, 1, 1, 1]], prompt=1)
    seen: list[list[int]] = []
    out = generate(model, torch.zeros(3, 1, dtype=torch.long), 5, temperature=0.0, use_cache=False, eos_token_id=5,
                   on_token=lambda token: seen.append(token[:, 0].tolist()))  # fmt: skip
    assert out[:, 1:].tolist() == [[2, 5, 5, 5, 5], [2, 2, 4, 5, 5], [1, 1, 1, 1, 1]]
    assert seen == out[:, 1:].T.tolist()  # streamed as padded
    two = generate(model.__class__(model.script[:2], prompt=1), torch.zeros(2, 1, dtype=torch.long), 5,
                   temperature=0.0, use_cache=False, eos_token_id=5)  # fmt: skip
    assert two[:, 1:].tolist() == [[2, 5, 5, 5], [2, 2, 4, 5]]  # stops once both have ended
