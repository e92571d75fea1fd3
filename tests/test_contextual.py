"""One word through the pretrained encoder: locating it, its vectors per layer, its attention per head."""

from __future__ import annotations

import pytest
import torch

from selfattention.contextual import (
    DEFAULT_SENTENCES,
    DEFAULT_WORD,
    find_word,
    nearest_tokens,
    similarity_by_layer,
    word_attention,
    word_in_context,
)
from selfattention.inspect import capture
from selfattention.models.head_walkthrough import head_walkthrough
from selfattention.pretrained import PretrainedEncoder


@pytest.fixture(scope="module")
def bat(minilm: PretrainedEncoder):  # type: ignore[no-untyped-def]
    return word_in_context(minilm, DEFAULT_WORD, DEFAULT_SENTENCES)


def test_vectors_follow_the_word_through_every_layer(minilm: PretrainedEncoder, bat) -> None:  # type: ignore[no-untyped-def]
    assert bat.layer_names == ["static", "embeddings"] + [f"layer {n}" for n in range(1, 7)]
    assert bat.vectors.shape == (8, 4, 384)
    bat_id = minilm.tokenizer.token_to_id("bat")
    torch.testing.assert_close(bat.vectors[0], minilm.encoder.embeddings.word.weight[bat_id].expand(4, -1))
    for index, span in enumerate(bat.spans):
        assert bat.encoded.batch.tokens(index)[span.start] == "bat" and span.stop == span.start + 1
        torch.testing.assert_close(bat.vectors[-1, index], bat.encoded.output.last_hidden_state[index, span.start])


def test_same_meaning_stays_closer_than_different_meaning_in_the_last_layer(bat) -> None:  # type: ignore[no-untyped-def]
    # sentences 1-2 are about baseball, 3-4 about the animal: the claim the README makes from this output
    last = similarity_by_layer(bat.vectors)[-1]
    same = min(float(last[0, 1]), float(last[2, 3]))
    different = max(float(last[i, j]) for i in (0, 1) for j in (2, 3))
    assert same > different, (same, different)


def test_similarity_by_layer_is_the_cosine_of_each_pair() -> None:
    vectors = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]])  # (1 layer, 3 sentences, 2)
    expected = torch.tensor([[[1.0, 0.5**0.5, 0.0], [0.5**0.5, 1.0, -(0.5**0.5)], [0.0, -(0.5**0.5), 1.0]]])
    torch.testing.assert_close(similarity_by_layer(vectors), expected)


def test_a_word_of_several_pieces_is_their_mean(minilm: PretrainedEncoder) -> None:
    sentences = ["Bats rely on echolocation at night.", "Dolphins also use echolocation, and echolocation works."]
    result = word_in_context(minilm, "echolocation", sentences)
    assert result.spans[0].pieces == ["echo", "##lo", "##cation"] and result.spans[1].occurrences == 2
    span = result.spans[1]
    hidden = result.encoded.output.hidden_states[3][1, span.start : span.stop]  # (3, C)
    torch.testing.assert_close(result.vectors[4, 1], hidden.mean(0))


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("cave", r"'cave' is not a word of sentence 1 \('He swung the bat.*its words are \['he', 'swung'"),
        ("baseball bat", "give one word, not 'baseball bat' .2 words"),
        ("  ", "the word is empty"),
    ],
)
def test_a_word_not_in_a_sentence_is_named(minilm: PretrainedEncoder, word: str, message: str) -> None:
    encoded = minilm.encode(list(DEFAULT_SENTENCES))
    with pytest.raises(ValueError, match=message):
        find_word(minilm, word, DEFAULT_SENTENCES, encoded)


def test_bats_is_not_bat(minilm: PretrainedEncoder) -> None:
    with pytest.raises(ValueError, match="'bat' is not a word of sentence 2"):
        word_in_context(minilm, "bat", ["A bat flew.", "Bats flew."])


def test_word_attention_equals_the_explicit_walkthrough(minilm: PretrainedEncoder, bat) -> None:  # type: ignore[no-untyped-def]
    rows = word_attention(minilm, bat, layer=6)
    assert [tuple(r.shape) for r in rows] == [(12, len(e.ids)) for e in bat.encoded.batch.encodings]
    for index, (sentence, span) in enumerate(zip(bat.sentences, bat.spans, strict=True)):
        torch.testing.assert_close(rows[index].sum(-1), torch.ones(12))
        head = 7 if index % 2 else 0
        walk = head_walkthrough(minilm, sentence, layer=6, head=head).walk
        torch.testing.assert_close(rows[index][head], walk.weights[span.start], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer 7 is out of range: the model has layers 1-6"):
        word_attention(minilm, bat, layer=7)


def test_head_walkthrough_equals_the_module_under_capture(minilm: PretrainedEncoder) -> None:
    text = "Your journey starts with one step"
    result = head_walkthrough(minilm, text, layer=2, head=3)
    with capture(minilm.encoder) as cap:
        minilm.encode([text])
    recorded = cap["layers.1.attention"].head(3)
    for ours, theirs in [
        (result.walk.queries, recorded.query[0]),
        (result.walk.keys, recorded.key[0]),
        (result.walk.scores, recorded.scores[0]),
        (result.walk.weights, recorded.weights[0]),
        (result.walk.context, recorded.context[0]),
    ]:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert result.walk.projections is not None and result.walk.projections[0].shape == (384, 32)
    with pytest.raises(ValueError, match="head 12 is out of range: each layer has heads 0-11"):
        head_walkthrough(minilm, text, head=12)


def test_nearest_tokens_leave_out_the_word_and_word_pieces(minilm: PretrainedEncoder) -> None:
    bat_id = minilm.tokenizer.token_to_id("bat")
    vector = minilm.encoder.embeddings.word.weight[bat_id]
    found = nearest_tokens(minilm, vector, 5, exclude=["bat"])
    assert len(found) == 5 and all(token.isalpha() and token != "bat" for token, _ in found)
    assert [c for _, c in found] == sorted((c for _, c in found), reverse=True)
    assert nearest_tokens(minilm, vector, 1)[0] == ("bat", pytest.approx(1.0, abs=1e-5))


def test_asking_for_more_tokens_than_allowed_lists_only_allowed_ones(minilm: PretrainedEncoder) -> None:
    vector = minilm.encoder.embeddings.word.weight[minilm.tokenizer.token_to_id("bat")]
    allowed = sum(token.isalpha() for token in minilm.vocabulary)
    found = nearest_tokens(minilm, vector, len(minilm.vocabulary) + 10)
    assert len(found) == allowed and all(token.isalpha() and cosine > -2.0 for token, cosine in found)
