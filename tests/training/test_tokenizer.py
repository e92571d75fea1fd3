"""Tokenizers: round trips, unknown characters, JSON save and load."""

from __future__ import annotations

import json

import pytest

from selfattention.training.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


def test_char_round_trip_and_sorted_ids() -> None:
    tok = CharTokenizer.train(TEXT)
    assert tok.chars == "".join(sorted(set(TEXT)))
    ids = tok.encode("to be")
    assert ids == [tok.chars.index(c) for c in "to be"]
    assert tok.decode(ids) == "to be"


def test_char_unknown_characters_are_named() -> None:
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match=r"2 character\(s\) not in the tokenizer's vocabulary of 3: 'x', 'z'"):
        tok.encode("abzx")


def test_bpe_round_trip_any_text() -> None:
    tok = BPETokenizer.train(TEXT, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    for text in ("To be, or not", "unseen ünïcödé ✓"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the question")) < len("the question")  # merges were learned


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_gives_the_same_ids(kind: str, tmp_path) -> None:
    tok = train_tokenizer(kind, TEXT, vocab_size=300)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.kind == kind
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode("that is the question") == tok.encode("that is the question")


def test_bad_files_and_kinds(tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"type": "char", "chars": "ab', encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer.json: not valid JSON"):
        load_tokenizer(path)
    path.write_text(json.dumps({"something": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match="neither a character tokenizer"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="unknown tokenizer 'words'"):
        train_tokenizer("words", TEXT)
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.train("")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_decoding_an_id_outside_the_vocabulary_names_it(kind: str) -> None:
    tok = train_tokenizer(kind, "hello world, hello there " * 20, vocab_size=300)
    for bad in (-1, tok.vocab_size):
        with pytest.raises(
            ValueError, match=rf"^token ids \[{bad}\] are outside the vocabulary 0-{tok.vocab_size - 1}$"
        ):
            tok.decode([tok.encode("h")[0], bad])
