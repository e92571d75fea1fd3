"""``selfattention context``: one word in several sentences, followed through a pretrained encoder."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from torch import Tensor

from selfattention.cli.context_probes import add_probe_arguments, follow_in_language_model, probe_lines, probe_words
from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.models import MODEL_HELP, model_kind, refuse
from selfattention.cli.options import model_name, some_path
from selfattention.cli.pretrained_models import load_model
from selfattention.contextual import (
    DEFAULT_SENTENCES,
    DEFAULT_WORD,
    WordInContext,
    nearest_tokens,
    similarity_by_layer,
    word_attention,
    word_in_context,
)
from selfattention.files import make_folder
from selfattention.pretrained import PretrainedEncoder
from selfattention.probes import probe_vectors


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``context`` command."""
    parser = sub.add_parser(
        "context",
        help="how a pretrained model's layers pull one word toward its sentence's meaning",
        description="Follow one word through the layers of a pretrained encoder (all-MiniLM-L6-v2): the cosine "
        "similarity of its vectors across the sentences at each layer, the vocabulary tokens nearest to its "
        "contextual vector, and the tokens it attends to in each head of one layer; with --toward/--away, how "
        "far the word moves toward each probe word (docs/probes.md). With no sentences, compares "
        f"{DEFAULT_WORD!r} in two baseball and two animal sentences, probed toward cave, wings... and away from "
        "hit, swing... A causal language model (smollm2, FILE.gguf, DIR) gets the similarity and probe views.",
    )
    parser.add_argument("sentences", nargs="*", metavar="SENTENCE", help="two or more sentences containing WORD")
    parser.add_argument("--word", default=DEFAULT_WORD, help=f"the word to follow (default: {DEFAULT_WORD})")
    parser.add_argument(
        "--model",
        type=model_name,
        default="minilm",
        metavar="MODEL",
        help=f"{MODEL_HELP}; a language model gets the similarity and probe views only (default: minilm)",
    )
    parser.add_argument("--layer", type=int, help="layer for nearest tokens and attention, from 0 (default: the last)")
    parser.add_argument(
        "--top",
        type=int,
        default=5,
        help="nearest tokens to list (default: 5); attention lists the top min(TOP, 3) per head",
    )
    parser.add_argument(
        "--plot", metavar="DIR", type=some_path, help="also save a line chart and per-sentence heatmaps in DIR"
    )
    add_probe_arguments(parser)
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute and print the three views; optionally save the pictures."""
    sentences = list(args.sentences) or list(DEFAULT_SENTENCES)
    if len(sentences) < 2:
        raise UsageError(f"give at least two sentences to compare, got {len(sentences)}")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    kind = model_kind(args.model)
    refuse("context", args.model, kind, ("encoder", "gguf", "checkpoint"), "it follows a word through a model's layers")
    probes = probe_words(args, sentences)
    if kind != "encoder":
        return _language_model(args, sentences, probes)
    model = load_model(args.model, resolve_device(args.device))
    layers = model.config.num_hidden_layers
    layer = layers - 1 if args.layer is None else args.layer  # 0-based, as everywhere on the command line
    if not 0 <= layer < layers:
        raise UsageError(f"--layer {layer} is out of range: the model has layers 0-{layers - 1}")
    result = word_in_context(model, args.word, sentences)
    similarity = similarity_by_layer(result.vectors)
    attention = word_attention(model, result, layer + 1)  # the library counts layers from 1
    lines = _header(model.name, result)
    lines += _similarity_table(result.word, _names(result), similarity)
    lines += _nearest(model, result, layer, args.top)
    lines += _attention(result, attention, layer, args.top)
    if probes is not None:
        table = model.encoder.embeddings.word.weight

        def static(words: list[str]) -> Tensor:
            return probe_vectors(table, [model.tokenizer.encode(w, add_special_tokens=False).ids for w in words])

        lines += probe_lines(result.word, _names(result), result.vectors, probes, static, f"layer {layer}")
    if args.plot:
        lines += _plots(result, similarity, attention, layer, Path(args.plot))
    print("\n".join(lines))
    return 0


def _header(name: str, result: WordInContext) -> list[str]:
    lines = [f'{name}: "{result.word}" in {len(result.sentences)} sentences']
    for index, (sentence, span) in enumerate(zip(result.sentences, result.spans, strict=True), start=1):
        note = f"  (first of {span.occurrences})" if span.occurrences > 1 else ""
        lines.append(f"  {index}  {sentence}{note}")
    pieces = result.spans[0].pieces
    if len(pieces) > 1:
        lines.append(
            f'"{result.word}" is {len(pieces)} word pieces ({" ".join(pieces)}): its vector is their mean, '
            "its attention row the mean of theirs."
        )
    return lines


def _names(result: WordInContext) -> list[str]:
    """The depths as the command line numbers layers: ``static``, ``embeddings``, ``layer 0`` ... ``layer L-1``."""
    return [f"layer {int(name.split()[1]) - 1}" if name.startswith("layer ") else name for name in result.layer_names]


def _similarity_table(word: str, names: list[str], similarity: Tensor) -> list[str]:
    pairs = list(itertools.combinations(range(similarity.shape[-1]), 2))
    lines = ["", f'Cosine similarity of "{word}" between sentences i-j, from the static embedding up:']
    lines.append(f"{'':<11}" + "".join(f"{f'{i + 1}-{j + 1}':>7}" for i, j in pairs))
    for name, matrix in zip(names, similarity, strict=True):
        lines.append(f"{name:<11}" + "".join(f"{float(matrix[i, j]):7.3f}" for i, j in pairs))
    return lines


def _language_model(
    args: argparse.Namespace, sentences: list[str], probes: tuple[list[str], list[str], list[bool]] | None
) -> int:
    """The similarity table and the probe view for a causal language model."""
    if args.plot:
        raise UsageError("--plot is only used with --model minilm (an encoder)")
    device = resolve_device(args.device)  # before anything is read: a missing GPU is said at once
    followed = follow_in_language_model(args.model, args.word, sentences, device)
    layers = len(followed.depths) - 1
    layer = layers - 1 if args.layer is None else args.layer
    if not 0 <= layer < layers:
        raise UsageError(f"--layer {layer} is out of range: the model has layers 0-{layers - 1}")
    lines = [f'{followed.name}: "{args.word}" in {len(sentences)} sentences (causal: each copy sees only the '
             "tokens before it)"]  # fmt: skip
    lines += [f"  {index}  {sentence}" for index, sentence in enumerate(sentences, start=1)]
    lines += _similarity_table(args.word, followed.depths, similarity_by_layer(followed.vectors))
    if probes is not None:
        lines += probe_lines(args.word, followed.depths, followed.vectors, probes, followed.static, f"layer {layer}")
    print("\n".join(lines))
    return 0


def _nearest(model: PretrainedEncoder, result: WordInContext, layer: int, top: int) -> list[str]:
    depth = _names(result).index(f"layer {layer}")
    exclude = [result.word.lower(), *result.spans[0].pieces]
    lines = [
        "",
        f'Vocabulary tokens nearest to "{result.word}" in layer {layer} '
        f'(cosine with the static embeddings; "{result.word}" itself left out):',
    ]
    for index in range(len(result.sentences)):
        found = nearest_tokens(model, result.vectors[depth, index], top, exclude=exclude)
        lines.append(f"  {index + 1}  " + ", ".join(f"{token} {cosine:.2f}" for token, cosine in found))
    return lines


def _attention(result: WordInContext, attention: list[Tensor], layer: int, top: int) -> list[str]:
    shown = min(top, 3)
    lines = ["", f'Tokens "{result.word}" attends to in layer {layer}, per head (top {shown} weights):']
    for index, rows in enumerate(attention):
        tokens = result.encoded.batch.tokens(index)
        lines.append(f"  sentence {index + 1}")
        for head, row in enumerate(rows):
            values, positions = row.topk(min(shown, row.numel()))
            cells = ", ".join(f"{tokens[int(p)]} {float(v):.2f}" for v, p in zip(values, positions, strict=True))
            lines.append(f"    head {head:>2}: {cells}")
    return lines


def _plots(result: WordInContext, similarity: Tensor, attention: list[Tensor], layer: int, folder: Path) -> list[str]:
    from selfattention.viz.heatmap import plot_weights
    from selfattention.viz.lines import plot_lines

    make_folder(folder)
    pairs = itertools.combinations(range(len(result.sentences)), 2)
    series = {f"{i + 1}-{j + 1}": similarity[:, i, j].tolist() for i, j in pairs}
    chart = folder / "context-similarity.png"
    title = f'cosine similarity of "{result.word}" between sentences, per layer'
    plot_lines(series, _names(result), chart, title=title, ylabel="cosine similarity")
    written = [chart]
    for index, rows in enumerate(attention):
        path = folder / f"context-attention-{index + 1}.png"
        heads = [f"{result.word}, head {h}" for h in range(rows.shape[0])]  # each row: the word as query
        title = f'attention of "{result.word}" in layer {layer}, sentence {index + 1}'
        plot_weights(rows, heads, result.encoded.batch.tokens(index), path, title=title)
        written.append(path)
    return ["", "Pictures written: " + ", ".join(str(p) for p in written)]
