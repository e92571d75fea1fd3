"""``selfattention context --toward W,... --away W,... --sense N,...``: does the word move toward its sense's words?

``context`` calls :func:`add_probe_arguments` on its parser, :func:`probe_lines` for the view, and
:func:`follow_in_language_model` for a causal language model (``--model smollm2``, a ``.gguf`` file or a
checkpoint), where only the similarity table and the probe view apply. The math is in
:mod:`selfattention.probes`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfattention.cli.errors import UsageError
from selfattention.contextual import DEFAULT_SENTENCES, DEFAULT_WORD
from selfattention.probes import probe_vectors, sense_shift, similarity_change, word_in_language_model

DEFAULT_TOWARD = ("cave", "wings", "vampire", "insects", "mammal")
DEFAULT_AWAY = ("hit", "swing", "base", "baseball")
DEFAULT_SENSE = (3, 4)
BASELINE = ("table", "paper", "music", "green", "window", "money", "chair", "letter")
"""Words unrelated to either sense of "bat": the mean size of their shifts is the noise level to compare with."""
SUMMARY = ("toward", "away", "baseline")


def _words(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",")]
    if not all(words):
        raise argparse.ArgumentTypeError(f"give words separated by commas, got {text!r}")
    return words


def _numbers(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"give sentence numbers separated by commas, got {text!r}") from None


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--toward``, ``--away`` and ``--sense``."""
    parser.add_argument(
        "--toward",
        type=_words,
        metavar="W,...",
        help=f"probe words of the first sense (default with the default sentences: {','.join(DEFAULT_TOWARD)})",
    )
    parser.add_argument(
        "--away",
        type=_words,
        metavar="W,...",
        help=f"probe words of the other sense (default with the default sentences: {','.join(DEFAULT_AWAY)})",
    )
    parser.add_argument(
        "--sense",
        type=_numbers,
        metavar="N,...",
        help="the sentences (from 1) of the first sense; the rest are the other "
        f"(default with the default sentences: {','.join(map(str, DEFAULT_SENSE))}, the animal)",
    )


def probe_words(args: argparse.Namespace, sentences: Sequence[str]) -> tuple[list[str], list[str], list[bool]] | None:
    """``(toward, away, sense flags)`` for the probe view, or ``None`` when it is not asked for.

    Raises:
        UsageError: probe words without ``--sense`` on sentences of your own, or a bad ``--sense``.
    """
    default = list(sentences) == list(DEFAULT_SENTENCES) and args.word == DEFAULT_WORD
    if args.toward is None and args.away is None and args.sense is None:
        if not default:
            return None
        return list(DEFAULT_TOWARD), list(DEFAULT_AWAY), _flags(list(DEFAULT_SENSE), len(sentences))
    if args.sense is None and not default:
        raise UsageError("--toward and --away need --sense N,...: the sentences (from 1) of the first sense")
    sense = list(DEFAULT_SENSE) if args.sense is None else args.sense
    return list(args.toward or ()), list(args.away or ()), _flags(sense, len(sentences))


def _flags(sense: list[int], count: int) -> list[bool]:
    bad = [n for n in sense if not 1 <= n <= count]
    if bad:
        raise UsageError(f"--sense {bad} out of range: there are sentences 1-{count}")
    if len(set(sense)) == count:
        raise UsageError(f"--sense names every sentence ({sense}); leave at least one for the other sense")
    return [n in sense for n in range(1, count + 1)]


def probe_lines(
    word: str,
    depths: Sequence[str],
    vectors: Tensor,
    probes: tuple[list[str], list[str], list[bool]],
    static: Callable[[list[str]], Tensor],
    layer: str,
) -> list[str]:
    """The probe view: the sense shift per depth, then each sentence's similarity change at depth ``layer``.

    Args:
        word: the word followed. depths: the names of the depths, ``vectors (L, N, C)`` in that order.
        probes: ``(toward, away, sense flags)`` from :func:`probe_words`.
        static: probe words -> their static vectors ``(K, C)``.
        layer: the depth whose similarity changes are listed.
    """
    toward, away, flags = probes
    words = toward + away
    shift = sense_shift(vectors, flags, static(words)) if words else torch.zeros(len(depths), 0)  # (L, K)
    noise = sense_shift(vectors, flags, static(list(BASELINE))).abs().mean(dim=1)  # (L,)
    first = ", ".join(str(n) for n, f in enumerate(flags, start=1) if f)
    second = ", ".join(str(n) for n, f in enumerate(flags, start=1) if not f)
    width = max(7, *(len(w) + 1 for w in words)) if words else 7
    lines = [
        "",
        f'Probe words: cosine of the shift mean(sentences {first}) − mean(sentences {second}) of "{word}" with '
        "each word's static embedding",
        f"(+: the first sense lies further toward the word; baseline: mean |cosine| of {len(BASELINE)} unrelated "
        "words)",
        f"{'':<11}"
        + "".join(f"{w:>{width}}" for w in words)
        + "".join(f"{h:>9}" for h in ("toward", "away", "baseline")),
    ]
    for index, name in enumerate(depths):
        row = shift[index]
        means = [row[: len(toward)], row[len(toward) :]]
        summary = "".join(f"{float(m.mean()):+9.3f}" if m.numel() else f"{'-':>9}" for m in means)
        cells = "".join(f"{float(v):+{width}.3f}" for v in row)
        lines.append(f"{name:<11}{cells}{summary}{float(noise[index]):9.3f}")
    if words:
        depth = list(depths).index(layer)
        change = similarity_change(vectors, static(words))[depth]  # (N, K)
        lines += [
            "",
            f'Change in cosine with each probe word from "{word}"\'s static embedding to {layer}, per sentence:',
        ]
        lines.append(f"{'':<11}" + "".join(f"{w:>{width}}" for w in words))
        for index, row in enumerate(change, start=1):
            sense = "first" if flags[index - 1] else "other"
            lines.append(f"  {index} {sense:<7}" + "".join(f"{float(v):+{width}.3f}" for v in row))
    return lines


@dataclass(frozen=True)
class Followed:
    """A word followed through a model, ready for the printed views.

    Attributes:
        name: the model's name. depths: names of the depths, as the command line numbers layers.
        vectors: ``(L, N, C)`` in the order of ``depths``. static: probe words -> static vectors ``(K, C)``.
    """

    name: str
    depths: list[str]
    vectors: Tensor
    static: Callable[[list[str]], Tensor]


def follow_in_language_model(spec: str, word: str, sentences: list[str], device: Any = "cpu") -> Followed:
    """``word`` through the causal language model ``spec`` (``smollm2``, a ``.gguf`` file or a checkpoint), run
    on ``device``; the vectors come back on the CPU.

    Raises:
        UsageError: a model that is not a language model, or a sentence without the word.
    """
    from selfattention.cli.models import load_causal

    lm = load_causal(spec)
    lm.model.to(device)
    try:
        result = word_in_language_model(lm.model, lm.encode, lm.decode, word, sentences)
    except ValueError as error:
        raise UsageError(str(error)) from error
    table = lm.model.tok_emb.weight

    def static(words: list[str]) -> Tensor:
        return probe_vectors(table, [lm.encode(" " + w) for w in words]).cpu()

    depths = ["static", *(f"layer {n}" for n in range(len(result.layer_names) - 1))]
    return Followed(lm.name, depths, result.vectors, static)
