"""The logit lens against the model's own output and a forward pass stopped early by hand."""

from __future__ import annotations

import pytest
import torch

from selfattention.lens import logit_lens, top_predictions
from selfattention.models.gpt import GPT, GPTConfig

IDS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])


def random_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=17, context_length=8, emb_dim=16, num_layers=3, num_heads=2)).eval()


@torch.no_grad()
def test_the_last_layer_of_the_lens_is_the_models_logits() -> None:
    model = random_gpt()
    lens = logit_lens(model, IDS)
    assert lens.shape == (3, 2, 5, 17)
    assert torch.equal(lens[-1], model(IDS)[0])


@torch.no_grad()
def test_an_earlier_layer_is_the_head_applied_to_that_blocks_output() -> None:
    model = random_gpt()
    x = model.tok_emb(IDS) + model.pos_emb(torch.arange(5))  # type: ignore[misc]
    for block in model.blocks[:2]:
        x = block(x)
    torch.testing.assert_close(logit_lens(model, IDS)[1], model.out_head(model.final_norm(x)))


def test_top_predictions_are_the_most_likely_tokens() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    probs, ids = top_predictions(logits, 2)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(probs, logits.softmax(-1)[:, [1, 2]])
    with pytest.raises(ValueError, match="k \\(5\\) must be between 1 and the vocabulary size 4"):
        top_predictions(logits, 5)


def test_a_model_without_an_output_head_is_refused(minilm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="BertEncoder is not a causal language model"):
        logit_lens(minilm.encoder, IDS)


@pytest.mark.slow
def test_smollm2_names_paris_at_the_last_layer(smollm2) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([smollm2.encode("The capital of France is")])
    _, top = top_predictions(logit_lens(smollm2.model, ids)[:, 0, -1], 1)  # (L, 1)
    assert smollm2.decode([int(top[-1, 0])]) == " Paris"
