"""Tokenizers that turn text into token ids and back: characters (the default) or byte-level BPE.

Both are saved as one JSON file (``tokenizer.json``) beside a checkpoint and loaded without running any
code: the character tokenizer as ``{"type": "char", "chars": "..."}``, the BPE one in the format of the
Hugging Face ``tokenizers`` library, trained here on the corpus (nothing is downloaded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from selfattention.files import parse_json, write_text

KINDS = ("char", "bpe")


class Tokenizer(Protocol):
    """What training and generation need from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int:
        """How many distinct token ids there are."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        ...

    def to_json(self) -> str:
        """The tokenizer as JSON, for :func:`load_tokenizer`."""
        ...


class CharTokenizer:
    """One token per character of the training text, ids in sorted character order.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.encode("hell"), tok.decode([3, 2]), tok.vocab_size
    ([1, 0, 2, 2], 'ol', 4)
    """

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"a character tokenizer needs distinct characters, got {chars[:40]!r}")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the characters of ``text``."""
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of characters in the vocabulary."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``.

        Raises:
            ValueError: naming the characters that are not in the vocabulary.
        """
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise ValueError(
                f"{len(unknown)} character(s) not in the tokenizer's vocabulary of {self.vocab_size}: {shown}"
            )
        return [self._ids[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of ``ids``.

        Raises:
            ValueError: an id outside ``0 .. vocab_size - 1`` (naming it; a negative one would index from the end).
        """
        ids = [int(i) for i in ids]
        _check_ids(ids, self.vocab_size)
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        """``{"type": "char", "chars": ...}``."""
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library: any text encodes, nothing is unknown."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = 512) -> BPETokenizer:
        """Learn ``vocab_size`` byte-level BPE tokens (at least the 256 bytes) from ``text``."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not text:
            raise ValueError("cannot train a BPE tokenizer on empty text")
        if vocab_size < 257:
            raise ValueError(f"a byte-level BPE vocab_size must exceed the 256 bytes, got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        lines = text.splitlines(keepends=True)
        tok.train_from_iterator([lines[i : i + 1000] for i in range(0, len(lines), 1000)], trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, bytes included."""
        return int(self._tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``."""
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (bytes that do not form UTF-8 become U+FFFD).

        Raises:
            ValueError: an id outside ``0 .. vocab_size - 1`` (naming it).
        """
        ids = [int(i) for i in ids]
        _check_ids(ids, self.vocab_size)
        return str(self._tok.decode(ids))

    def to_json(self) -> str:
        """The ``tokenizers`` JSON format."""
        return str(self._tok.to_str())


def _check_ids(ids: list[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0-{vocab_size - 1}")


def train_tokenizer(kind: str, text: str, *, vocab_size: int = 512) -> Tokenizer:
    """A ``"char"`` or ``"bpe"`` tokenizer trained on ``text`` (``vocab_size`` is for BPE only)."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {list(KINDS)}")


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> None:
    """Write ``tokenizer`` as JSON to ``path`` atomically."""
    write_text(path, tokenizer.to_json())


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer written by :func:`save_tokenizer`.

    Raises:
        ValueError: naming the file, when it is not a tokenizer this package wrote.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file ({error.reason})") from None
    data = parse_json(text, path)
    if isinstance(data, dict) and data.get("type") == "char":
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise ValueError(f"{path}: a character tokenizer needs a string 'chars'")
        return CharTokenizer(chars)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_str(text))
        except Exception as error:  # the library raises its own exception type
            raise ValueError(f"{path}: not a readable tokenizers file ({error})") from None
    raise ValueError(f"{path}: neither a character tokenizer nor a tokenizers BPE file")
