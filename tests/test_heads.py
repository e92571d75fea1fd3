"""Head detectors against hand-wired heads whose scores are known exactly, and against a direct recount."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from selfattention.heads import PATTERNS, copy_losses, detect_heads, pattern_scores, repeated_tokens
from selfattention.inspect import capture
from selfattention.models.gpt import GPT, GPTConfig

POSITIONS = 16  # dims 0-15 of the residual stream hold the position (one-hot), dims 16-31 the token (one-hot)
SHARP = 100.0  # query scale: a wrong key scores 100 / sqrt(16) = 25 below the right one, weight e^-25


def wired_gpt() -> GPT:
    """One layer, two heads, no norm before attention: head 0 attends to the previous position, head 1 to
    every position holding the same token (itself included)."""
    model = GPT(GPTConfig(vocab_size=16, context_length=POSITIONS, emb_dim=32, num_layers=1, num_heads=2)).eval()
    block: Any = model.blocks[0]
    block.norm1 = nn.Identity()
    eye = torch.eye(POSITIONS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.pos_emb.weight[:, :POSITIONS] = eye  # type: ignore[union-attr]
        model.tok_emb.weight[:, POSITIONS:] = eye
        attn = block.attn
        attn.W_query.weight[:POSITIONS, 1:POSITIONS] = SHARP * eye[:, :-1]  # head 0: q_t = SHARP e_{t-1}
        attn.W_key.weight[:POSITIONS, :POSITIONS] = eye  # k_j = e_j
        attn.W_query.weight[POSITIONS:, POSITIONS:] = SHARP * eye  # head 1: q = SHARP * token
        attn.W_key.weight[POSITIONS:, POSITIONS:] = eye
    return model


def test_a_previous_token_head_scores_one_as_previous_token_and_zero_as_induction() -> None:
    scores = detect_heads(wired_gpt(), length=8, batch=3, seed=1)
    torch.testing.assert_close(scores.previous_token[0, 0], torch.tensor(1.0), atol=1e-9, rtol=0)
    torch.testing.assert_close(scores.induction[0, 0], torch.tensor(0.0), atol=1e-9, rtol=0)
    torch.testing.assert_close(scores.duplicate_token[0, 0], torch.tensor(0.0), atol=1e-9, rtol=0)
    # the first token gets weight only from position 1 of 15 (its successor): 1/15 of the rows
    torch.testing.assert_close(scores.sink[0, 0], torch.tensor(1 / 15), atol=1e-9, rtol=0)
    assert scores.top("previous_token", 1)[0][:2] == (0, 0)


def test_a_same_token_head_splits_the_second_copy_between_both_occurrences() -> None:
    model = wired_gpt()
    ids = torch.cat([torch.arange(3, 10), torch.arange(3, 10)]).unsqueeze(0)  # 7 distinct tokens, twice
    with capture(model) as cap:
        model(ids)
    scores = pattern_scores(cap["blocks.0.attn"].weights, 7)
    # second copy: the token itself and its earlier occurrence, 1/2 each. capture() recomputes the weights as
    # exp(s - lse) from the fused kernel's float32 log-sum-exp, so two equal weights come out as 0.5 within a few
    # float32 ulps (seen: 0.49999976, 4 ulps), not as the eager softmax's exact 0.5: atol 1e-6 allows that
    # rounding and still fails a head that splits 0.6/0.4 or attends to one occurrence only.
    torch.testing.assert_close(scores["duplicate_token"][1], torch.tensor(0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores["induction"][1], torch.tensor(0.0), atol=1e-9, rtol=0)


def test_pattern_scores_match_a_loop_over_positions() -> None:
    torch.manual_seed(0)
    weights = torch.rand(2, 3, 10, 10).tril().softmax(dim=-1)  # any numbers: the definitions are read per cell
    n = 5
    scores = pattern_scores(weights, n)
    for h in range(3):
        want = {
            "previous_token": [weights[b, h, i, i - 1] for b in range(2) for i in range(1, 10)],
            "duplicate_token": [weights[b, h, i, i - n] for b in range(2) for i in range(n, 10)],
            "induction": [weights[b, h, i, i - n + 1] for b in range(2) for i in range(n, 10)],
            "sink": [weights[b, h, i, 0] for b in range(2) for i in range(1, 10)],
        }
        for name in PATTERNS:
            torch.testing.assert_close(scores[name][h], torch.stack(want[name]).mean())


def test_copy_losses_are_the_loss_on_r1_to_rn_minus_1_in_each_copy() -> None:
    torch.manual_seed(0)
    ids = repeated_tokens(11, 4, batch=2, seed=3)
    logits = torch.randn(2, 8, 11)
    first, second = copy_losses(logits, ids)
    log_probs = logits.log_softmax(dim=-1)
    loss = torch.tensor([[-log_probs[b, i, ids[b, i + 1]] for b in range(2)] for i in range(7)])  # predicts i + 1
    assert first == pytest.approx(float(loss[0:3].mean()), rel=1e-6)
    assert second == pytest.approx(float(loss[4:7].mean()), rel=1e-6)


def test_repeated_tokens_are_seeded_and_repeat() -> None:
    ids = repeated_tokens(100, 6, batch=2, seed=5, low=10)
    assert ids.shape == (2, 12) and torch.equal(ids[:, :6], ids[:, 6:])
    assert int(ids.min()) >= 10
    assert torch.equal(ids, repeated_tokens(100, 6, batch=2, seed=5, low=10))
    assert not torch.equal(ids, repeated_tokens(100, 6, batch=2, seed=6, low=10))
    with pytest.raises(ValueError, match="length"):
        repeated_tokens(100, 1)
    with pytest.raises(ValueError, match="unknown pattern 'copy'"):
        detect_heads(wired_gpt(), length=4).pattern("copy")


def test_an_encoder_gets_scores_but_no_loss(minilm) -> None:  # type: ignore[no-untyped-def]
    scores = detect_heads(minilm.encoder, length=10, batch=1)
    assert scores.induction.shape == (6, 12) and scores.first_copy_loss is None
    assert bool(((scores.sink >= 0) & (scores.sink <= 1)).all())


@pytest.mark.slow
def test_smollm2_has_induction_heads_that_make_the_second_copy_easy(smollm2) -> None:  # type: ignore[no-untyped-def]
    scores = detect_heads(smollm2.model, length=20, batch=2)
    assert scores.induction.shape == (30, 9)
    assert float(scores.induction.max()) > 0.5  # in-context copying is one of the best-known behaviours
    assert scores.second_copy_loss is not None and scores.first_copy_loss is not None
    assert scores.second_copy_loss < scores.first_copy_loss - 5
