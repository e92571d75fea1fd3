"""``selfattention explain --model minilm "TEXT"``: the walk-through on a real sentence with a real head.

``explain`` hands over to :func:`explain_model` when ``--model`` is given; :func:`add_model_arguments` adds
``--model`` to its parser, whose ``--layer`` (0-5, default 0; 0-based as everywhere on the command line, while
:func:`head_walkthrough` counts from 1), ``--head`` (0-11) and positional ``TEXT``
this module reads. ``--query``, ``--all``,
``--plot`` and ``--format`` keep their meaning from ``explain``; the options that choose the worked
example's inputs or projections (``--embeddings``, ``--tokens``, ``--projections``, ``--causal``) do not apply,
since the model's own tokens and learned W^Q, W^K, W^V are used, and the model always scales by 1/sqrt(D).
``--query`` keeps ``explain``'s default, "journey", the worked example's word and so a word piece of the
default TEXT; for a TEXT without it, the query is the first word piece after ``[CLS]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch import Tensor

from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.formatting import matrix, projections_document, steps_document, vector
from selfattention.cli.models import MODEL_HELP
from selfattention.cli.options import json_text, model_name
from selfattention.cli.pretrained_models import load_model
from selfattention.models.head_walkthrough import HeadWalkthrough, head_walkthrough
from selfattention.walkthrough import find_query

DEFAULT_TEXT = "Your journey starts with one step"
DEFAULT_QUERY = "journey"
SHOWN = 6  # numbers shown of each D-wide vector in the text output
_NOT_WITH_MODEL = ("embeddings", "tokens", "projections", "causal")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` to ``explain``'s parser (``TEXT``, ``--layer`` and ``--head`` are ``explain``'s own)."""
    parser.add_argument(
        "--model",
        type=model_name,
        metavar="MODEL",
        help=f"{MODEL_HELP}. minilm: walk through one head on TEXT (layers 0-5, default 0; heads 0-11; "
        f'TEXT defaults to "{DEFAULT_TEXT}"); smollm2, FILE.gguf, DIR: what each token of TEXT attends to '
        "(layers and heads from 0, default: the last layer)",
    )
    add_device_argument(parser, note="; with --model or --checkpoint")


def explain_model(args: argparse.Namespace) -> int:
    """Print (and with ``--plot`` draw) the walk-through of ``args.model``'s head on ``args.text``."""
    for name in _NOT_WITH_MODEL:
        if getattr(args, name, None):
            raise UsageError(f"--{name} does not apply with --model: the model's own tokens and W^Q, W^K, W^V are used")
    text = DEFAULT_TEXT if args.text is None else args.text
    model = load_model(args.model, resolve_device(getattr(args, "device", "cpu")))
    layer = 0 if args.layer is None else args.layer  # 0-based here, as for every model of the command line
    layers = model.config.num_hidden_layers
    if not 0 <= layer < layers:
        raise ValueError(f"--layer {layer} is out of range: the model has layers 0-{layers - 1}")
    result = head_walkthrough(model, text, layer=layer + 1, head=args.head)
    tokens = result.walk.tokens
    query = getattr(args, "query", None)
    if query is None:  # the worked example's word where the text has it, else the first word piece
        query = DEFAULT_QUERY if DEFAULT_QUERY in tokens else "1"
    indices = list(range(len(tokens))) if getattr(args, "all", False) else [find_query(tokens, query)]
    plot = getattr(args, "plot", None)
    if plot:
        from selfattention.viz.heatmap import plot_weights

        title = f"{result.model}, layer {result.layer - 1}, head {result.head}: attention weights α"
        plot_weights(result.walk.weights, tokens, tokens, plot, title=title)
    if getattr(args, "format", "text") == "json":
        sys.stdout.write(to_json(result, indices))
        return 0
    sys.stdout.write(to_text(result, indices))
    if plot:
        print(f"\nheatmap of α written to {plot}")
    return 0


def _vector(values: Tensor) -> str:
    return vector(values, shown=SHOWN)


def to_text(result: HeadWalkthrough, indices: Sequence[int]) -> str:
    """The walk-through as the text the command prints."""
    walk = result.walk
    tokens = walk.tokens
    (length, width_in), width = walk.inputs.shape, walk.values.shape[1]
    source = "the embedding output" if result.layer == 1 else f"the output of layer {result.layer - 2}"
    first, last = result.head * width, (result.head + 1) * width - 1
    assert walk.projections is not None and walk.scale is not None
    lines = [
        f'{result.model}, layer {result.layer - 1}, head {result.head} of {result.num_heads}: "{" ".join(tokens)}"',
        f"x: {length} word pieces, each a vector of width {width_in} ({source}).",
        f"The head's learned W^Q, W^K, W^V are ({width_in}, {width}) each, with biases b^Q, b^K, b^V of width "
        f"{width}: output features {first}-{last} of the layer's {width_in} x {width_in} projections.",
        f"  W^Q[0] = {_vector(walk.projections[0][0])}",
        f"  b^Q    = {_vector(result.biases[0])}",
        f"Scores are scaled by 1/sqrt({width}) = {walk.scale:.4f}; no mask: every word piece sees every other.",
        "",
        "The four steps, for query token i:",
        "  1. project  q_i = x_i W^Q + b^Q, k_j = x_j W^K + b^K, v_j = x_j W^V + b^V",
        "  2. scores   ω_ij = q_i · k_j",
        "  3. weights  α_ij = softmax_j(ω_ij · scale)",
        "  4. context  z_i = Σ_j α_ij v_j",
    ]
    for i in indices:
        lines += _one_query(result, i)
    lines += ["", "Attention weights α (row: query, column: key; each row sums to 1):"]
    lines += matrix(walk.weights, tokens, tokens)
    lines += [
        "",
        f"Each z_i ({width} numbers) is joined with the other {result.num_heads - 1} heads' into a vector of "
        f"width {width_in}, which out_proj mixes into the layer's attention output.",
    ]
    return "\n".join(lines) + "\n"


def _one_query(result: HeadWalkthrough, i: int) -> list[str]:
    walk = result.walk
    assert walk.scale is not None
    lines = ["", f'Query {i} "{walk.tokens[i]}": q = {_vector(walk.queries[i])}', ""]
    lines.append(f"  {'j':>2}  {'token':<12} {'ω_ij':>9} {'ω_ij·scale':>11} {'α_ij':>8}")
    for j, token in enumerate(walk.tokens):
        omega = float(walk.scores[i, j])
        lines.append(f"  {j:>2}  {token:<12} {omega:9.4f} {omega * walk.scale:11.4f} {float(walk.weights[i, j]):8.4f}")
    lines.append(f"  {'':>2}  {'sum':<12} {'':>9} {'':>11} {float(walk.weights[i].sum()):8.4f}")
    lines.append(f"  z_{i} = Σ_j α_ij v_j = {_vector(walk.context[i])}")
    return lines


def to_json(result: HeadWalkthrough, indices: Sequence[int]) -> str:
    """The walk-through as a JSON document (float32-precision numbers, the whole W^Q, W^K, W^V of the head)."""
    walk = result.walk
    assert walk.projections is not None
    document = {
        "model": result.model,
        "layer": result.layer - 1,
        "head": result.head,
        "tokens": walk.tokens,
        "inputs": walk.inputs.tolist(),
        "projections": projections_document(walk.projections),
        "biases": dict(zip(("b_query", "b_key", "b_value"), (b.tolist() for b in result.biases), strict=True)),
        **steps_document(walk),
        "walkthrough": [{"index": i, "token": walk.tokens[i]} for i in indices],
    }
    return json_text(document)
