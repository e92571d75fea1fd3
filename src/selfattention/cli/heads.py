"""``selfattention heads --model M``: which heads are previous-token, duplicate-token, induction or sink heads.

Runs :func:`selfattention.heads.detect_heads` (a seeded sequence of random tokens repeated twice) and prints the
top heads of each pattern and the loss per token on each copy; ``--ablate L.H,...`` reruns it with those heads
zeroed (``--mean``: set to their mean output) and prints the change of the loss. ``--plot DIR`` writes one
layers x heads heatmap per pattern.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.models import MODEL_HELP, load_causal, model_kind, refuse
from selfattention.cli.options import at_least, json_text, model_name, seed, some_path
from selfattention.files import make_folder

NAMES = {
    "previous_token": "previous-token",
    "duplicate_token": "duplicate-token",
    "induction": "induction",
    "sink": "sink",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``heads`` command."""
    parser = sub.add_parser(
        "heads",
        help="find previous-token, duplicate-token, induction and sink heads; ablate heads",
        description="Score every head on random tokens repeated twice: previous-token, duplicate-token, "
        "induction (attention to the token after the earlier occurrence) and sink (weight on the first token), "
        "and the loss per token on each copy. See docs/heads.md for the definitions.",
    )
    parser.add_argument(
        "--model", type=model_name, default="smollm2", metavar="MODEL", help=f"{MODEL_HELP} (default: smollm2)"
    )
    parser.add_argument("--length", type=at_least(2), default=50, help="random tokens per copy (default: 50)")
    parser.add_argument("--batch", type=at_least(1), default=4, help="sequences of random tokens (default: 4)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random tokens (default: 0)")
    parser.add_argument("--top", type=at_least(1), default=5, help="heads listed per pattern (default: 5)")
    parser.add_argument("--ablate", metavar="L.H,...", help="zero these heads (layer.head, from 0) and report the loss")
    parser.add_argument("--mean", action="store_true", help="with --ablate: set the heads to their mean output")
    parser.add_argument(
        "--plot", metavar="DIR", type=some_path, help="write a layers x heads heatmap per pattern into DIR"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"18.6,17.3"`` -> ``[(18, 6), (17, 3)]``.

    Raises:
        UsageError: an item that is not ``LAYER.HEAD`` with two whole numbers.
    """
    heads = []
    for item in text.split(","):
        layer, dot, head = item.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise UsageError(f"--ablate item {item.strip()!r} is not LAYER.HEAD (e.g. 18.6)")
        heads.append((int(layer), int(head)))
    return heads


def load_model(spec: str, device: Any = "cpu") -> tuple[Any, str]:
    """The model ``spec`` names for head analysis, on ``device``, and its name: a causal language model or MiniLM.

    Raises:
        UsageError: the worked example (it has no learned heads) or a missing weights package.
    """
    kind = model_kind(spec)
    refuse("heads", spec, kind, ("encoder", "gguf", "checkpoint"), "the worked example has no learned heads")
    if kind == "encoder":
        from selfattention.cli.pretrained_models import load_model as load_encoder

        return load_encoder(spec, device).encoder.eval(), spec
    lm = load_causal(spec)
    return lm.model.to(device).eval(), lm.name


def run(args: argparse.Namespace) -> int:
    """Detect the heads, optionally ablate some, print the table or JSON, and draw the heatmaps."""
    import torch

    from selfattention.heads import PATTERNS, copy_losses, detect_heads, repeated_tokens
    from selfattention.interventions import ablate_heads, check_heads, head_means, model_logits

    heads = parse_heads(args.ablate) if args.ablate is not None else []
    if args.mean and not heads:
        raise UsageError("--mean needs --ablate L.H,...")
    device = resolve_device(args.device)  # before anything is read: a missing GPU is said at once
    model, name = load_model(args.model, device)
    if heads and not hasattr(model, "out_head"):
        raise UsageError(f"--ablate needs a causal language model (its loss); {args.model} is an encoder")
    check_heads(model, heads)
    config = model.config
    context = getattr(config, "context_length", None) or getattr(config, "max_position_embeddings", None)
    if context is not None and 2 * args.length > context:
        raise UsageError(
            f"--length {args.length} makes runs of 2 x {args.length} = {2 * args.length} tokens, more than the "
            f"model's context of {context}; give --length {context // 2} or less"
        )
    scores = detect_heads(model, length=args.length, batch=args.batch, seed=args.seed)
    ablated = None
    if heads:
        ids = repeated_tokens(int(model.config.vocab_size), args.length, batch=args.batch, seed=args.seed).to(device)
        with torch.no_grad():
            means = head_means(model, ids) if args.mean else None
            with ablate_heads(model, heads, means=means):
                logits = model_logits(model, ids)
        assert logits is not None
        ablated = copy_losses(logits, ids)
    if args.plot:
        _plot(scores, Path(args.plot), name, PATTERNS)
    if args.format == "json":
        sys.stdout.write(json_text(_document(scores, name, args, heads, ablated)))
        return 0
    sys.stdout.write(to_text(scores, name, args, heads, ablated))
    if args.plot:
        print(f"\nheatmaps written to {args.plot}/heads_<pattern>.png")
    return 0


def _label(heads: list[tuple[int, int]]) -> str:
    return ", ".join(f"{layer}.{head}" for layer, head in heads)


def to_text(
    scores: Any, name: str, args: argparse.Namespace, heads: list[tuple[int, int]], ablated: tuple[float, float] | None
) -> str:
    """The table the command prints."""
    layers, num_heads = scores.induction.shape
    lines = [
        f"{name}: {layers} layers x {num_heads} heads; {args.batch} sequences of {args.length} random tokens, "
        f"each repeated twice (seed {args.seed})",
        "",
        "top heads per pattern (layer.head score)",
    ]
    for pattern, label in NAMES.items():
        cells = [f"{layer}.{head} {value:.3f}" for layer, head, value in scores.top(pattern, args.top)]
        lines.append(f"  {label:<16}" + "".join(f"{cell:<13}" for cell in cells).rstrip())
    if scores.first_copy_loss is not None:
        first, second = scores.first_copy_loss, scores.second_copy_loss
        lines += [
            "",
            f"loss per token (nats): first copy {first:.2f}, second copy {second:.2f} "
            f"({second - first:+.2f} from seeing the tokens once)",
        ]
    if ablated is not None:
        how = "mean" if args.mean else "zero"
        lines.append(
            f"with {_label(heads)} {how}-ablated: first copy {ablated[0]:.2f} ({ablated[0] - first:+.2f}), "
            f"second copy {ablated[1]:.2f} ({ablated[1] - second:+.2f})"
        )
    return "\n".join(lines) + "\n"


def _document(
    scores: Any, name: str, args: argparse.Namespace, heads: list[tuple[int, int]], ablated: tuple[float, float] | None
) -> dict[str, Any]:
    return {
        "model": name,
        "length": args.length,
        "batch": args.batch,
        "seed": args.seed,
        "scores": {pattern: scores.pattern(pattern) for pattern in NAMES},
        "top": {
            pattern: [
                {"layer": layer, "head": head, "score": value} for layer, head, value in scores.top(pattern, args.top)
            ]
            for pattern in NAMES
        },
        "loss": None
        if scores.first_copy_loss is None
        else {"first_copy": scores.first_copy_loss, "second_copy": scores.second_copy_loss},
        "ablation": None
        if ablated is None
        else {
            "heads": [{"layer": layer, "head": head} for layer, head in heads],
            "mean": args.mean,
            "loss": {"first_copy": ablated[0], "second_copy": ablated[1]},
        },
    }


def _plot(scores: Any, folder: Path, name: str, patterns: tuple[str, ...]) -> None:
    from selfattention.viz.grid import plot_grid

    make_folder(folder)
    for pattern in patterns:
        title = f"{name}: {NAMES[pattern]} score"
        plot_grid(scores.pattern(pattern), folder / f"heads_{pattern}.png", title=title)
