"""Ablation and patching against a forward pass recomputed by hand from the recorded head outputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from selfattention.inspect import capture
from selfattention.interventions import (
    PatchingResult,
    ablate_heads,
    head_means,
    head_outputs,
    patch_heads,
    patch_residual,
    patching_effects,
    residual_inputs,
)
from selfattention.models.gpt import GPT, GPTConfig


def random_gpt(num_layers: int = 1) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, context_length=16, emb_dim=16, num_layers=num_layers, num_heads=4)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.4)
    return model


def by_hand(model: GPT, ids: Tensor, context: Tensor) -> Tensor:
    """Logits of a one-layer GPT whose attention produced the per-head ``context (B, H, T, E)``."""
    block: Any = model.blocks[0]
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))  # type: ignore[misc]
    batch, heads, tokens, width = context.shape
    x = x + block.attn.out_proj(context.transpose(1, 2).reshape(batch, tokens, heads * width))
    x = x + block.mlp(block.norm2(x))
    return model.out_head(model.final_norm(x))


IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])


@torch.no_grad()
def test_zero_ablation_removes_exactly_that_heads_contribution() -> None:
    model = random_gpt()
    with capture(model) as cap:
        model(IDS)
    context = cap["blocks.0.attn"].context.clone()  # (B, H, T, E)
    context[:, [1, 3]] = 0.0
    with ablate_heads(model, [(0, 1), (0, 3)]):
        ablated, _ = model(IDS)
    torch.testing.assert_close(ablated, by_hand(model, IDS, context))
    assert not torch.allclose(ablated, model(IDS)[0])  # the hooks are gone again


@torch.no_grad()
def test_mean_ablation_puts_the_heads_mean_output_everywhere() -> None:
    model = random_gpt()
    with capture(model) as cap:
        model(IDS)
    context = cap["blocks.0.attn"].context.clone()
    means = head_means(model, IDS)
    torch.testing.assert_close(means[0][2], context[:, 2].mean(dim=(0, 1)))
    context[:, 2] = context[:, 2].mean(dim=(0, 1))
    with ablate_heads(model, [(0, 2)], means=means):
        ablated, _ = model(IDS)
    torch.testing.assert_close(ablated, by_hand(model, IDS, context))


@torch.no_grad()
def test_patching_a_head_copies_its_clean_output_into_the_corrupted_run() -> None:
    model = random_gpt()
    clean, corrupted = IDS[:1], IDS[1:]
    with capture(model) as cap:
        model(clean)
        model(corrupted)
    calls = cap.calls("blocks.0.attn")
    context = calls[1].context.clone()
    context[:, 0] = calls[0].context[:, 0]
    with patch_heads(model, [(0, 0)], head_outputs(model, clean)):
        patched, _ = model(corrupted)
    torch.testing.assert_close(patched, by_hand(model, corrupted, context))


@torch.no_grad()
def test_patching_the_residual_stream_at_layer_0_everywhere_gives_the_clean_run() -> None:
    model = random_gpt(num_layers=3)
    clean, corrupted = IDS[:1], IDS[1:]
    streams = residual_inputs(model, clean)
    with patch_residual(model, 0, streams[0]):
        patched, _ = model(corrupted)
    assert torch.equal(patched, model(clean)[0])
    with patch_heads(model, [(1, 2)], head_outputs(model, clean)):  # the residual hook is gone
        assert not torch.equal(model(corrupted)[0], model(clean)[0])


@torch.no_grad()
def test_patching_effects_match_one_patch_at_a_time() -> None:
    model = random_gpt(num_layers=2)
    clean, corrupted = IDS[:1], IDS[1:]
    result = patching_effects(model, clean, corrupted, answer=5, wrong=7)

    def diff(logits: Tensor) -> float:
        return float(logits[0, -1, 5] - logits[0, -1, 7])

    assert result.clean == pytest.approx(diff(model(clean)[0]))
    assert result.corrupted == pytest.approx(diff(model(corrupted)[0]))
    source, streams = head_outputs(model, clean), residual_inputs(model, clean)
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        with patch_heads(model, [(layer, head)], source):
            want = diff(model(corrupted)[0]) - result.corrupted
        assert float(result.heads[layer, head]) == pytest.approx(want, abs=1e-5)
    for layer, position in [(0, 0), (1, 4), (1, 7)]:
        positions = torch.tensor([position])
        with patch_residual(model, layer, streams[layer], positions):
            want = diff(model(corrupted)[0]) - result.corrupted
        assert float(result.residual[layer, position]) == pytest.approx(want, abs=1e-5)
    gap = result.clean - result.corrupted
    torch.testing.assert_close(result.restored(result.heads), result.heads / gap)


@torch.no_grad()
def test_patching_a_run_with_itself_has_no_effect() -> None:
    model = random_gpt(num_layers=2)
    result = patching_effects(model, IDS[:1], IDS[:1], answer=5, wrong=7)
    assert torch.equal(result.heads, torch.zeros(2, 4)) and torch.equal(result.residual, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="same logit difference"):
        result.restored(result.heads)


def test_a_gap_within_float32_rounding_is_no_gap() -> None:
    """Two prompts whose differences agreed to 5e-7 printed fractions of +1071 and -1011 (noise over noise)."""
    heads = torch.tensor([[5e-4, -5e-4]])
    near = PatchingResult(clean=0.113, corrupted=0.113 - 4.8e-7, heads=heads, residual=heads)
    with pytest.raises(ValueError, match=r"\(\+0.113 and \+0.113, a gap of 4.8e-07\): nothing to restore$"):
        near.restored(heads)
    far = PatchingResult(clean=20.0, corrupted=19.99, heads=heads, residual=heads)  # 5e-4 of 20: a real gap
    torch.testing.assert_close(far.restored(heads), heads / (20.0 - 19.99))


def test_bad_heads_and_prompts_are_named() -> None:
    model = random_gpt()
    with (
        pytest.raises(ValueError, match="layer 2 out of range: the model has layers 0-0"),
        ablate_heads(model, [(2, 0)]),
    ):
        pass
    with pytest.raises(ValueError, match="head 4 out of range: layer 0 has heads 0-3"), ablate_heads(model, [(0, 4)]):
        pass
    with pytest.raises(ValueError, match=r"clean \(1, 8\) and corrupted \(1, 7\)"):
        patching_effects(model, IDS[:1], IDS[:1, :7], 1, 2)
    with pytest.raises(ValueError, match="answer token 99 is outside the vocabulary 0-22"):
        patching_effects(model, IDS[:1], IDS[1:], 99, 2)


@torch.no_grad()
def test_edits_keep_the_attention_on_its_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import selfattention.modules as modules

    model = random_gpt(num_layers=2)
    eager_calls = []
    fast = modules.attention

    def watched(*args: Any, **kwargs: Any) -> Any:
        eager_calls.append(kwargs.get("return_weights", False))
        return fast(*args, **kwargs)

    monkeypatch.setattr(modules, "attention", watched)
    source = head_outputs(model, IDS[:1])
    with ablate_heads(model, [(0, 1)]), patch_heads(model, [(1, 2)], source):
        model(IDS[1:])
    with patch_residual(model, 1, residual_inputs(model, IDS[:1])[1]):
        model(IDS[1:])
    assert len(eager_calls) == 2 * 4 and not any(eager_calls)  # 4 runs of 2 layers, none asking for α
