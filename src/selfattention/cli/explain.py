"""``selfattention explain``: walk through the four steps of attention on the worked example (or your tokens)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch import Tensor

from selfattention import examples
from selfattention.cli.errors import UsageError
from selfattention.cli.explain_checkpoint import add_checkpoint_arguments, explain_checkpoint
from selfattention.cli.explain_model import add_model_arguments, explain_model
from selfattention.cli.explain_rollout import add_rollout_arguments, explain_rollout
from selfattention.cli.formatting import matrix, projections_document, steps_document, vector
from selfattention.cli.models import model_kind
from selfattention.cli.options import at_least, figure_path, json_text, model_name, seed
from selfattention.inputs import load_embeddings
from selfattention.inspect import capture_projections
from selfattention.walkthrough import Walkthrough, find_query, random_projections, walk

EXAMPLE_SENTENCE = " ".join(examples.TOKENS)
MAX_PROJECTIONS = 4096
"""The widest ``--projections``: the walk-through prints every column of W^Q, W^K and W^V."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``explain`` command."""
    parser = sub.add_parser(
        "explain",
        help="walk through attention step by step on the worked example",
        description="Walk through self-attention (scores ω, weights α, context z) on the worked example "
        f'"{EXAMPLE_SENTENCE}" or on your own token embeddings.',
    )
    parser.add_argument(
        "--query", help="query token: a word or a 0-based index (default: journey, or the first token of other text)"
    )
    parser.add_argument("--all", action="store_true", help="walk through every query, not just one")
    parser.add_argument("--scaled", action="store_true", help="divide the scores by sqrt(d) before the softmax")
    parser.add_argument("--causal", action="store_true", help="each token attends only to itself and earlier tokens")
    parser.add_argument(
        "--projections",
        type=at_least(1, MAX_PROJECTIONS),
        metavar="D",
        help="random trainable W^Q, W^K, W^V of width D (1 to 4096; torch.rand, in that order) instead of the identity",
    )
    parser.add_argument("--seed", type=seed, default=123, help="seed for --projections (default: 123)")
    parser.add_argument(
        "--heads", type=at_least(1), default=1, help="split the --projections width into this many heads (default: 1)"
    )
    parser.add_argument("--head", type=int, default=0, help="the head to walk through (0-based, default: 0)")
    parser.add_argument("--layer", type=int, help="with --checkpoint or --model: the layer to show, from 0")
    parser.add_argument("text", nargs="?", help="with --checkpoint or --model: the text whose attention to show")
    parser.add_argument(
        "--embeddings", type=model_name, metavar="FILE", help="your own token vectors: .json, .csv or .npy"
    )
    parser.add_argument("--tokens", help="the tokens of a .npy file, separated by spaces")
    parser.add_argument(
        "--plot", metavar="FILE", type=figure_path, help="also save a heatmap of α (.png, .svg, .pdf or .jpg)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    add_checkpoint_arguments(parser)
    add_model_arguments(parser)
    add_rollout_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute the walk-through and print it; optionally save a heatmap."""
    if args.checkpoint and args.model:
        raise UsageError("choose one of --checkpoint DIR and --model NAME")
    if args.rollout or args.flow:
        return explain_rollout(args)
    kind = model_kind(args.model) if args.model else None
    if kind in ("checkpoint", "gguf"):
        args.checkpoint = args.model
    if args.device != "cpu" and kind not in ("encoder", "checkpoint", "gguf") and not args.checkpoint:
        raise UsageError(f"--device {args.device} is only used with a model: --model NAME or --checkpoint DIR")
    if args.logit_lens and not args.checkpoint:
        raise UsageError("--logit-lens needs a causal language model: --model smollm2, FILE.gguf or a CHECKPOINT_DIR")
    if args.checkpoint:
        return explain_checkpoint(args)
    if kind == "encoder":
        return explain_model(args)
    if args.text is not None or args.layer is not None:
        raise UsageError("TEXT and --layer are only used with --checkpoint DIR or --model NAME")
    if args.embeddings:
        tokens, inputs = load_embeddings(args.embeddings, args.tokens.split() if args.tokens else None)
    else:
        if args.tokens:
            raise ValueError("--tokens is only used with --embeddings FILE.npy")
        tokens, inputs = list(examples.TOKENS), examples.embeddings()
    if args.projections is None:
        if args.heads != 1 or args.head != 0:
            raise UsageError("--heads and --head need --projections D (the identity has one head)")
        result = walk(tokens, inputs, scaled=args.scaled, causal=args.causal)
        all_heads = result.weights.unsqueeze(0)  # (1, T, T)
    else:
        result, all_heads = _projected(tokens, inputs, args)
    if args.all and args.query is not None:
        raise UsageError("choose one of --query (one token) and --all (every token)")
    query = args.query if args.query is not None else "journey" if "journey" in tokens else "0"
    indices = list(range(len(tokens))) if args.all else [find_query(tokens, query)]
    if args.plot and all_heads.shape[0] > 1:
        from selfattention.viz.heads import plot_heads

        plot_heads(all_heads, tokens, tokens, args.plot, title=_title(result) + " per head")
    elif args.plot:
        from selfattention.viz.heatmap import plot_weights

        plot_weights(result.weights, tokens, tokens, args.plot, title=_title(result))
    text = to_json(result, indices) if args.format == "json" else to_text(result, indices)
    sys.stdout.write(text)
    if args.plot and args.format == "text":
        print(f"\nheatmap of α written to {args.plot}")
    return 0


def _projected(tokens: list[str], inputs: Tensor, args: argparse.Namespace) -> tuple[Walkthrough, Tensor]:
    """The walk-through of head ``args.head`` of a module with random projections, read through capture()."""
    if args.heads < 1 or args.projections % args.heads != 0:
        raise UsageError(f"--projections ({args.projections}) must be divisible by --heads ({args.heads})")
    if not 0 <= args.head < args.heads:
        raise UsageError(f"--head {args.head} is out of range: there are {args.heads} heads (0-{args.heads - 1})")
    record = capture_projections(
        inputs, args.projections, seed=args.seed, num_heads=args.heads, causal=args.causal, scaled=args.scaled
    )
    head = record.head(args.head)
    width = args.projections // args.heads
    columns = slice(args.head * width, (args.head + 1) * width)  # this head's columns of each W
    matrices = random_projections(inputs.shape[1], args.projections, args.seed)
    projections = (matrices[0][:, columns], matrices[1][:, columns], matrices[2][:, columns])
    result = Walkthrough(
        tokens=tokens,
        inputs=inputs,
        projections=projections,
        queries=head.query,
        keys=head.key,
        values=head.value,
        scale=record.scale if args.scaled else None,
        causal=args.causal,
        scores=head.scores,
        weights=head.weights,
        context=head.context,
    )
    return result, record.weights


def _title(result: Walkthrough) -> str:
    parts = ["attention weights α"]
    if result.scale is not None:
        parts.append("scaled")
    if result.causal:
        parts.append("causal")
    return ", ".join(parts)


def to_text(result: Walkthrough, indices: Sequence[int]) -> str:
    """The walk-through as the text the command prints."""
    tokens = result.tokens
    width_in, width = result.inputs.shape[1], result.values.shape[1]
    lines = [f'Self-attention on "{" ".join(tokens)}": {len(tokens)} tokens, embeddings of width {width_in}.']
    if result.projections is None:
        lines.append("W^Q = W^K = W^V = identity, so each token's query, key and value is its embedding x.")
    else:
        lines.append(f"Random trainable W^Q, W^K, W^V of shape ({width_in}, {width}); q = x W^Q, k = x W^K, v = x W^V:")
        for name, weights in zip(("W^Q", "W^K", "W^V"), result.projections, strict=True):
            lines.append(f"  {name} = " + ", ".join(vector(row) for row in weights))
        lines += ["", "  token        query q                 key k                   value v"]
        for i, token in enumerate(tokens):
            q, k, v = (vector(t[i]) for t in (result.queries, result.keys, result.values))
            lines.append(f"  {token:<10} {q:<23} {k:<23} {v}")
    scaling = f"scaled by 1/sqrt({width}) = {result.scale:.4f}" if result.scale is not None else "unscaled"
    masking = "causal: a token sees only itself and earlier tokens" if result.causal else "no mask"
    lines.append(f"Scores are {scaling}; {masking}.")
    softmax = "softmax_j(ω_ij · scale)" if result.scale is not None else "softmax_j(ω_ij)"
    steps = [
        (
            "project",
            "q_i = x_i W^Q, k_j = x_j W^K, v_j = x_j W^V",
            "the token's question, every token's answer, content",
        ),
        ("scores", "ω_ij = q_i · k_j", "how well token j matches the query"),
        ("weights", f"α_ij = {softmax}", "scores made positive, summing to 1 over j"),
        ("context", "z_i = Σ_j α_ij v_j", f"the query rewritten from its context ({width} numbers, one per dimension)"),
    ]
    lines += ["", "The four steps, for query token i:"]
    lines += [f"  {n}. {name:<9} {formula:<46} {meaning}" for n, (name, formula, meaning) in enumerate(steps, 1)]
    for i in indices:
        lines += _one_query(result, i)
    lines += ["", "Attention weights α (row: query, column: key; each row sums to 1):"]
    lines += matrix(result.weights, tokens, tokens)
    lines += ["", f"Context vectors z (one per token, width {width}):"]
    lines += matrix(result.context, tokens)
    return "\n".join(lines) + "\n"


def _one_query(result: Walkthrough, i: int) -> list[str]:
    token, width = result.tokens[i], result.values.shape[1]
    lines = ["", f'Query {i} "{token}": q = {vector(result.queries[i])}', ""]
    lines.append(f"  {'j':>2}  {'token':<10} {'ω_ij':>8} {'α_ij':>8}   α_ij · v_j")
    for j, key_token in enumerate(result.tokens):
        allowed = not result.causal or j <= i
        omega = f"{float(result.scores[i, j]):8.4f}" if allowed else f"{'masked':>8}"
        alpha = float(result.weights[i, j])
        lines.append(f"  {j:>2}  {key_token:<10} {omega} {alpha:8.4f}   {vector(alpha * result.values[j])}")
    total = float(result.weights[i].sum())
    lines.append(f"  {'':>2}  {'sum':<10} {'':>8} {total:8.4f}   z = {vector(result.context[i])}")
    lines.append(f'  z_{i} = Σ_j α_ij v_j has {width} numbers: the new vector for "{token}".')
    return lines


def to_json(result: Walkthrough, indices: Sequence[int]) -> str:
    """The walk-through as a JSON document (numbers at float32 precision: see :func:`json_text`)."""
    document = {
        "tokens": result.tokens,
        "embeddings": result.inputs.tolist(),
        "projections": None if result.projections is None else projections_document(result.projections),
        **steps_document(result),
        "walkthrough": [
            {
                "index": i,
                "token": result.tokens[i],
                "scores": result.scores[i].tolist(),
                "weights": result.weights[i].tolist(),
                "context": result.context[i].tolist(),
            }
            for i in indices
        ],
    }
    return json_text(document)
