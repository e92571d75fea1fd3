"""Probe words: sense shift and similarity change against cosines worked out by hand, and the word's vectors in
a causal model against the model's own forward pass."""

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_rotary_gpt
from selfattention.probes import find_tokens, probe_vectors, sense_shift, similarity_change, word_in_language_model

# depth 0 (static): both sentences at [1, 0]; depth 1: sentence 0 moved to [1, 1], sentence 1 to [1, -1]
VECTORS = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, -1.0]]])  # (L=2, N=2, C=2)
PROBES = torch.tensor([[0.0, 1.0], [0.0, -2.0], [3.0, 0.0]])  # up, down, sideways


def test_sense_shift_is_the_cosine_of_the_difference_of_the_means() -> None:
    shift = sense_shift(VECTORS, [True, False], PROBES)
    # depth 0: the difference is [0, 0] (cosine 0 by torch's clamped norm); depth 1: [0, 2], pointing up
    assert_close(shift, torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]]))
    assert_close(sense_shift(VECTORS, [False, True], PROBES), -shift)  # the other sense: the opposite sign


def test_sense_shift_averages_the_sentences_of_each_sense() -> None:
    vectors = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])  # senses: {0, 1} and {2}
    # mean of the first sense [1, 1] minus [0, 0]: cosine with [1, 0] is 1 / sqrt(2)
    assert_close(sense_shift(vectors, [True, True, False], torch.tensor([[1.0, 0.0]])), torch.tensor([[2**-0.5]]))


def test_sense_shift_refuses_a_sense_without_sentences() -> None:
    with pytest.raises(ValueError, match=r"at least one sentence, got flags \[True, True\]"):
        sense_shift(VECTORS, [True, True], PROBES)
    with pytest.raises(ValueError, match="3 flags for 2 sentences"):
        sense_shift(VECTORS, [True, False, True], PROBES)


def test_similarity_change_subtracts_the_static_cosine() -> None:
    change = similarity_change(VECTORS, PROBES)
    assert change.shape == (2, 2, 3)
    assert_close(change[0], torch.zeros(2, 3))
    s = 2**-0.5  # [1, ±1] against up, down, sideways, minus [1, 0]'s cosines (0, 0, 1)
    assert_close(change[1], torch.tensor([[s, -s, s - 1], [-s, s, s - 1]]))


def test_probe_vectors_average_the_rows_of_each_word() -> None:
    table = torch.arange(12.0).reshape(6, 2)
    assert_close(probe_vectors(table, [[1], [2, 4]]), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    with pytest.raises(ValueError, match=r"probe words \[1\]"):
        probe_vectors(table, [[1], []])


def test_find_tokens_tries_each_spelling_in_order() -> None:
    assert find_tokens([5, 7, 8, 7, 8], [[7, 8]]) == [1, 2]
    assert find_tokens([3, 4], [[9], [4]]) == [1]
    assert find_tokens([3, 4], [[9], []]) is None


def test_word_in_language_model_reads_the_block_outputs_at_the_word() -> None:
    model = tiny_rotary_gpt(num_layers=3)
    vocabulary = " abcdefghijkl"  # one character a token: id = index

    def encode(text: str) -> list[int]:
        return [vocabulary.index(c) for c in text]

    def decode(ids: list[int]) -> str:
        return "".join(vocabulary[i] for i in ids)

    result = word_in_language_model(model, encode, decode, "cab", ["a cab", "cab fed"])
    assert result.positions == [[1, 2, 3, 4], [0, 1, 2]]  # " cab" inside a text, "cab" at its start
    assert result.layer_names == ["static", "layer 1", "layer 2", "layer 3"]
    assert result.vectors.shape == (4, 2, 16)
    assert_close(result.vectors[0, 1], model.tok_emb.weight[[3, 1, 2]].mean(dim=0).detach())
    assert result.tokens[1] == list("cab fed")
    # one-token words give single positions: "c", "a", "b" are positions 0, 1, 2 of "cab fed"
    singles = [word_in_language_model(model, encode, decode, c, ["cab fed"]).vectors[:, 0] for c in "cab"]
    assert_close(result.vectors[:, 1], torch.stack(singles).mean(dim=0))
    with torch.no_grad():  # the last block's output, through the final norm and head, is the model's logits
        logits, _ = model(torch.tensor([encode("cab fed")]))
        for position, vectors in enumerate(singles):
            assert_close(model.out_head(model.final_norm(vectors[-1])), logits[0, position])
    with pytest.raises(ValueError, match=r"'gab' is not in sentence 1 \('a cab'\); its tokens are"):
        word_in_language_model(model, encode, decode, "gab", ["a cab"])
