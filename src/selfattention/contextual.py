"""One word in several sentences, followed through a pretrained encoder's layers.

The same word ("bat") starts every sentence with the same static vector, a row of the word-embedding table;
attention then mixes in the other tokens of its sentence, layer by layer. :func:`word_in_context` records the
word's vector at every depth, from which :func:`similarity_by_layer` measures how far the sentences pull the
copies apart, :func:`nearest_tokens` names the vocabulary tokens closest to a contextual vector, and
:func:`word_attention` shows which tokens the word attends to in each head of a layer.

A word the tokenizer splits into several word pieces ("echolocation" -> ``echo ##lo ##cation``) is
represented by the mean of its pieces' vectors, and its attention row by the mean of their rows (still a
distribution over the keys). A word that occurs more than once in a sentence is taken at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattention.inspect import capture
from selfattention.pretrained import Encoded, PretrainedEncoder

DEFAULT_WORD = "bat"
DEFAULT_SENTENCES = (
    "He swung the bat and hit the ball into the stands.",
    "The player dropped his bat and ran to first base.",
    "A bat flew out of the cave at dusk to hunt insects.",
    "The bat hung upside down from the roof of the cave.",
)


@dataclass(frozen=True)
class WordSpan:
    """Where the word sits in one tokenized sentence: word pieces ``start .. stop - 1``."""

    start: int
    stop: int
    pieces: list[str]
    occurrences: int


@dataclass(frozen=True)
class WordInContext:
    """The word's vector at every depth in every sentence.

    Attributes:
        word: the word as given. sentences: the texts.
        spans: one :class:`WordSpan` per sentence.
        layer_names: ``"static"`` (the word-embedding row), ``"embeddings"`` (word + position + type,
            normalised), ``"layer 1"`` ... ``"layer L"``.
        vectors: ``(L + 2, N, C)``, in the order of ``layer_names``; N sentences.
        encoded: the encoder's tokens and hidden states for the sentences.
    """

    word: str
    sentences: list[str]
    spans: list[WordSpan]
    layer_names: list[str]
    vectors: Tensor
    encoded: Encoded


def find_word(model: PretrainedEncoder, word: str, sentences: Sequence[str], encoded: Encoded) -> list[WordSpan]:
    """Locate ``word`` in each tokenized sentence by its word pieces.

    Raises:
        ValueError: an empty word, a word the vocabulary lacks (a piece of it is ``[UNK]``), more than one
            word, or a sentence that does not contain it (naming the sentence and its words).
    """
    if not word.strip():
        raise ValueError("the word is empty")
    alone = model.tokenizer.encode(word, add_special_tokens=False)
    unknown = model.tokenizer.token_to_id("[UNK]")
    if not alone.ids or unknown in alone.ids:  # [UNK] stands for any unknown word: it would match them all
        raise ValueError(f"the word {word!r} has no tokens the model knows (its word pieces: {alone.tokens})")
    if len(set(alone.word_ids)) > 1:
        raise ValueError(f"give one word, not {word!r} ({len(set(alone.word_ids))} words to the tokenizer)")
    spans = []
    for index, (text, encoding) in enumerate(zip(sentences, encoded.batch.encodings, strict=True), start=1):
        words: dict[int, list[int]] = {}
        for position, word_id in enumerate(encoding.word_ids):
            if word_id is not None:
                words.setdefault(word_id, []).append(position)
        matches = [p for p in words.values() if [encoding.ids[i] for i in p] == alone.ids]
        if not matches:
            known = [" ".join(encoding.tokens[i] for i in p).replace(" ##", "") for p in words.values()]
            raise ValueError(f"{word!r} is not a word of sentence {index} ({text!r}); its words are {known}")
        first = matches[0]
        spans.append(WordSpan(first[0], first[-1] + 1, list(alone.tokens), len(matches)))
    return spans


def word_in_context(model: PretrainedEncoder, word: str, sentences: Sequence[str]) -> WordInContext:
    """Run the sentences through the encoder and collect ``word``'s vector at every depth.

    Raises:
        ValueError: bad sentences (see :meth:`PretrainedEncoder.tokenize`) or a word not found
            (see :func:`find_word`).
    """
    encoded = model.encode(sentences)
    spans = find_word(model, word, sentences, encoded)
    with torch.no_grad():
        static = model.encoder.embeddings.word.weight
        ids = encoded.batch.input_ids
        rows = [static[ids[i, s.start : s.stop]].mean(0) for i, s in enumerate(spans)]
        depths = [torch.stack(rows)]  # (N, C)
        for hidden in encoded.output.hidden_states:  # (N, T, C) each
            depths.append(torch.stack([hidden[i, s.start : s.stop].mean(0) for i, s in enumerate(spans)]))
    layers = len(encoded.output.hidden_states) - 1
    names = ["static", "embeddings", *(f"layer {n}" for n in range(1, layers + 1))]
    return WordInContext(word, list(sentences), spans, names, torch.stack(depths), encoded)


def similarity_by_layer(vectors: Tensor) -> Tensor:
    """Cosine similarity between every pair of sentences' vectors at each depth.

    Args:
        vectors: ``(L, N, C)``.

    Returns:
        ``(L, N, N)``; entry ``[l, i, j]`` is the cosine between sentence i's and j's vector at depth l.
    """
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    return unit @ unit.transpose(-1, -2)  # (L, N, C) @ (L, C, N) -> (L, N, N)


def nearest_tokens(
    model: PretrainedEncoder, vector: Tensor, k: int = 8, *, exclude: Sequence[str] = ()
) -> list[tuple[str, float]]:
    """The ``k`` vocabulary tokens whose static embeddings have the highest cosine with ``vector (C,)``.

    Only whole-word alphabetic tokens are candidates (no ``##`` pieces, ``[unused]`` slots, digits or
    punctuation), and the tokens in ``exclude`` (e.g. the word itself) are left out.

    Returns:
        ``[(token, cosine), ...]``, most similar first.
    """
    table = torch.nn.functional.normalize(model.encoder.embeddings.word.weight.detach(), dim=-1)  # (V, C)
    cosines = table @ torch.nn.functional.normalize(vector.detach(), dim=-1)  # (V,)
    skipped = set(exclude)
    allowed = torch.tensor([t.isalpha() and t not in skipped for t in model.vocabulary], device=cosines.device)
    cosines = cosines.masked_fill(~allowed, -2.0)  # below any cosine: never among the top
    top = cosines.topk(min(k, int(allowed.sum())))
    return [(model.vocabulary[int(i)], float(c)) for c, i in zip(top.values, top.indices, strict=True)]


def word_attention(model: PretrainedEncoder, result: WordInContext, layer: int) -> list[Tensor]:
    """The word's attention weights in every head of ``layer`` (1-based), one ``(H, T_i)`` tensor per sentence.

    The sentences are run again while :func:`selfattention.capture` records the layer; each tensor is cut to
    its sentence's own ``T_i`` tokens (padding gets no weight), so each head's row sums to 1.

    Raises:
        ValueError: a layer outside ``1 .. L``.
    """
    layers = model.config.num_hidden_layers
    if not 1 <= layer <= layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 1-{layers}")
    with capture(model.encoder) as cap:
        model.encode(result.sentences)
    weights = cap[f"layers.{layer - 1}.attention"].weights  # (N, H, T, T)
    rows = []
    for index, span in enumerate(result.spans):
        length = len(result.encoded.batch.encodings[index].ids)
        word_rows = weights[index, :, span.start : span.stop, :length]  # (H, pieces, T_i)
        rows.append(word_rows.mean(dim=1))  # (H, T_i): the word's query rows, averaged over its pieces
    return rows
