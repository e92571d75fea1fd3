"""Probe words: does a word's contextual vector move toward the words of its sense ("bat" toward "cave")?

The vectors of one word in several sentences (from :func:`selfattention.contextual.word_in_context` for an
encoder, :func:`word_in_language_model` for a causal language model) are ``(L, N, C)``: depths from the
static embedding up, ``N`` sentences. Probe words are read as *static* vectors: the mean of their tokens' rows
of the model's word-embedding table (:func:`probe_vectors`). Two measurements:

- :func:`sense_shift`: the difference between the mean vector of the sentences of one sense (the animal) and
  the mean of the others (the sport), at each depth, and its cosine with each probe word. Positive: the
  first sense's vectors lie further toward the probe word than the second's.
- :func:`similarity_change`: each sentence's cosine with each probe word at each depth, minus the cosine of
  the word's static embedding with it: how far context pulled that copy toward (or away from) the probe.

Cosines between a deep layer's vectors and the static embedding table compare two different spaces that are
only related through the residual stream; small values are expected, and :func:`sense_shift` on words
unrelated to either sense gives the baseline to compare with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.functional import cosine_similarity


@dataclass(frozen=True)
class WordVectors:
    """One word's vectors in several sentences of a causal language model, at every depth.

    Attributes:
        word: the word as given. sentences: the texts.
        positions: per sentence, the token positions of the word (its first occurrence).
        tokens: per sentence, the readable tokens of the whole sentence.
        layer_names: ``"static"`` (the token-embedding rows), ``"layer 1"`` ... ``"layer L"`` (block outputs).
        vectors: ``(L + 1, N, C)``, in the order of ``layer_names``; the mean over the word's tokens.
    """

    word: str
    sentences: list[str]
    positions: list[list[int]]
    tokens: list[list[str]]
    layer_names: list[str]
    vectors: Tensor


def sense_shift(vectors: Tensor, sense: Sequence[bool], probes: Tensor) -> Tensor:
    """Cosine of ``mean(first sense) − mean(second sense)`` with each probe vector, at each depth.

    Args:
        vectors: ``(L, N, C)``: the word's vector at each depth in each sentence.
        sense: ``N`` flags, ``True`` for the sentences of the first sense.
        probes: ``(K, C)`` static probe-word vectors.

    Returns:
        ``(L, K)``.

    Raises:
        ValueError: ``sense`` of the wrong length, or one sense with no sentence.

    >>> vectors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one depth, two sentences
    >>> sense_shift(vectors, [True, False], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    tensor([[0.7071, 0.0000]])
    """
    flags = torch.tensor(list(sense), dtype=torch.bool)
    if flags.numel() != vectors.shape[1]:
        raise ValueError(f"sense has {flags.numel()} flags for {vectors.shape[1]} sentences")
    if bool(flags.all()) or not bool(flags.any()):
        raise ValueError(f"each sense needs at least one sentence, got flags {flags.tolist()}")
    difference = vectors[:, flags].mean(dim=1) - vectors[:, ~flags].mean(dim=1)  # (L, C)
    return cosine_similarity(difference[:, None, :], probes[None, :, :].to(difference), dim=-1)  # (L, K)


def similarity_change(vectors: Tensor, probes: Tensor) -> Tensor:
    """Each sentence's cosine with each probe at each depth, minus that of depth 0 (the static embedding).

    Args:
        vectors: ``(L, N, C)``, depth 0 the static embedding. probes: ``(K, C)``.

    Returns:
        ``(L, N, K)``; depth 0 is all zeros.
    """
    cosines = cosine_similarity(vectors[:, :, None, :], probes[None, None, :, :].to(vectors), dim=-1)  # (L, N, K)
    return cosines - cosines[:1]


def probe_vectors(table: Tensor, token_ids: Sequence[Sequence[int]]) -> Tensor:
    """Static vectors of probe words: the mean of each word's rows of the embedding ``table (V, C)``.

    Raises:
        ValueError: a word with no tokens.
    """
    empty = [index for index, ids in enumerate(token_ids) if not ids]
    if empty:
        raise ValueError(f"probe words {empty} (0-based) have no tokens")
    return torch.stack([table[list(ids)].detach().float().mean(dim=0) for ids in token_ids])  # (K, C)


def find_tokens(ids: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[int] | None:
    """The positions of the first occurrence of any of ``candidates`` in ``ids``, trying them in order."""
    for pattern in candidates:
        width = len(pattern)
        for start in range(len(ids) - width + 1) if width else ():
            if list(ids[start : start + width]) == list(pattern):
                return list(range(start, start + width))
    return None


def word_in_language_model(
    model: nn.Module,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    word: str,
    sentences: Sequence[str],
) -> WordVectors:
    """Run each sentence through a causal language model and collect ``word``'s vector after every block.

    The word is looked up by its tokens, first as ``" " + word`` (how a BPE tokenizer spells a word inside a
    sentence), then as ``word`` alone (at the start of a text). In a causal model the word's vector has seen
    only the tokens before it.

    Args:
        model: a :class:`selfattention.GPT` or :class:`selfattention.models.llama.Llama` (``tok_emb``, ``blocks``).
        encode, decode: the model's tokenizer.
        word: the word to follow. sentences: texts that contain it.

    Raises:
        ValueError: an empty word, or a sentence without it (naming the sentence and its tokens).
    """
    if not word.strip():
        raise ValueError("the word is empty")
    candidates = [encode(" " + word), encode(word)]
    blocks = cast(nn.ModuleList, model.blocks)
    table = cast(nn.Embedding, model.tok_emb).weight  # (V, C)
    outputs: list[Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in blocks]
    positions, tokens, per_sentence = [], [], []
    try:
        for index, text in enumerate(sentences, start=1):
            ids = encode(text)
            found = find_tokens(ids, candidates)
            pieces = [decode([i]) for i in ids]
            if found is None:
                raise ValueError(f"{word!r} is not in sentence {index} ({text!r}); its tokens are {pieces}")
            outputs.clear()
            with torch.no_grad():
                idx = torch.tensor([ids], dtype=torch.long, device=table.device)
                model(idx)
                static = table[idx[0, found]].float().mean(dim=0)
            depths = [static] + [out[0, found].float().mean(dim=0) for out in outputs]  # (L + 1) x (C,)
            per_sentence.append(torch.stack(depths))
            positions.append(found)
            tokens.append(pieces)
    finally:
        for hook in hooks:
            hook.remove()
    names = ["static", *(f"layer {n}" for n in range(1, len(blocks) + 1))]
    vectors = torch.stack(per_sentence, dim=1).cpu()  # N x (L + 1, C) -> (L + 1, N, C)
    return WordVectors(word, list(sentences), positions, tokens, names, vectors)
