"""``selfattention patch --model M --clean TEXT --corrupted TEXT --answer A --wrong B``: activation patching.

The metric is ``logit(A) - logit(B)`` at the last position. Each head's output (and, unless
``--no-residual``, the residual stream entering each layer at each position) is copied from the clean run
into the corrupted run, one at a time, and the command prints how much of the gap between the two runs each
patch restores (:func:`selfattention.interventions.patching_effects`), as a table and, with ``--plot DIR``,
heatmaps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.models import MODEL_HELP, load_causal
from selfattention.cli.options import at_least, json_text, model_name, some_path
from selfattention.files import make_folder
from selfattention.viz.html import piece_labels

CLEAN = "The Eiffel Tower is in the city of"
CORRUPTED = "The Colosseum is in the city of"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``patch`` command."""
    parser = sub.add_parser(
        "patch",
        help="activation patching: which heads carry the difference between a clean and a corrupted prompt",
        description="Patch each head's output (and each layer's residual stream per position) from the clean "
        "run into the corrupted run and report the change of logit(ANSWER) - logit(WRONG) at the last "
        "position, as a fraction of the gap between the runs.",
    )
    parser.add_argument(
        "--model", type=model_name, default="smollm2", metavar="MODEL", help=f"{MODEL_HELP} (default: smollm2)"
    )
    parser.add_argument("--clean", default=CLEAN, help=f'the prompt whose answer is ANSWER (default: "{CLEAN}")')
    parser.add_argument(
        "--corrupted", default=CORRUPTED, help=f'the same number of tokens, answer WRONG (default: "{CORRUPTED}")'
    )
    parser.add_argument("--answer", default=" Paris", help='the clean answer, one token (default: " Paris")')
    parser.add_argument("--wrong", default=" Rome", help='the corrupted answer, one token (default: " Rome")')
    parser.add_argument("--top", type=at_least(1), default=8, help="heads listed (default: 8)")
    parser.add_argument("--no-residual", action="store_true", help="skip the residual stream (half the time)")
    parser.add_argument(
        "--plot", metavar="DIR", type=some_path, help="write the heatmaps patch_heads.png and patch_residual.png"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def one_token(encode: Any, text: str, option: str) -> int:
    """The id of ``text``, which must be one token.

    Raises:
        UsageError: text that is several tokens (naming them) or none.
    """
    ids = encode(text)
    if len(ids) != 1:
        raise UsageError(f"{option} {text!r} must be one token, but it is {len(ids)}: {ids}")
    return int(ids[0])


def run(args: argparse.Namespace) -> int:
    """Patch every head (and the residual stream), print the table or JSON, and draw the heatmaps."""
    import torch

    from selfattention.interventions import patching_effects

    device = resolve_device(args.device)  # before anything is read: a missing GPU is said at once
    lm = load_causal(args.model)
    prompts = []
    for option, text in (("--clean", args.clean), ("--corrupted", args.corrupted)):
        ids = lm.encode(text) if text else []  # a GGUF tokenizer refuses empty text in its own words
        if not ids:
            raise UsageError(f"{option} is empty: give a prompt of at least one token")
        prompts.append(ids)
    clean, corrupted = prompts
    if len(clean) != len(corrupted):
        raise UsageError(
            f"--clean has {len(clean)} tokens and --corrupted {len(corrupted)}: they need the same number "
            "(patching is position by position)"
        )
    answer, wrong = one_token(lm.encode, args.answer, "--answer"), one_token(lm.encode, args.wrong, "--wrong")
    if answer == wrong:
        raise UsageError(
            f"--answer {args.answer!r} and --wrong {args.wrong!r} are the same token ({answer}): nothing to compare"
        )

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\rpatching: {done}/{total} layers", end="" if done < total else "\n", file=sys.stderr)

    result = patching_effects(
        lm.model.to(device).eval(),
        torch.tensor([clean], device=device),
        torch.tensor([corrupted], device=device),
        answer,
        wrong,
        residual=not args.no_residual,
        progress=progress,
    )
    tokens = piece_labels(lm.decode, corrupted)
    if args.plot:
        _plot(result, tokens, Path(args.plot), args)
    if args.format == "json":
        sys.stdout.write(json_text(_document(result, tokens, lm.name, args)))
        return 0
    sys.stdout.write(to_text(result, tokens, lm.name, args, piece_labels(lm.decode, clean)))
    if args.plot:
        print(f"\nheatmaps written to {args.plot}/patch_heads.png and patch_residual.png")
    return 0


def to_text(result: Any, tokens: list[str], name: str, args: argparse.Namespace, clean: list[str]) -> str:
    """The tables the command prints (``tokens``: the corrupted prompt's, ``clean``: the clean prompt's)."""
    metric = f"logit({args.answer!r}) - logit({args.wrong!r})"
    lines = [
        f"{name}: {metric} at the last position",
        f"  clean     {args.clean!r}: {result.clean:+.3f}",
        f"  corrupted {args.corrupted!r}: {result.corrupted:+.3f}",
        "",
        "heads whose clean output restores the most of the gap (fraction restored; 1 = the clean run):",
    ]
    restored = result.restored(result.heads)
    values, flat = restored.flatten().topk(min(args.top, restored.numel()))
    width = restored.shape[1]
    lines += [f"  {f'{i // width}.{i % width}':<6} {float(v):+.3f}" for v, i in zip(values, flat.tolist(), strict=True)]
    if not args.no_residual:
        residual = result.restored(result.residual)
        label = max(6, *(len(t) for t in tokens + clean))
        lines += ["", "residual stream entering each layer, patched at one position (fraction restored):"]
        lines.append("  clean " + "".join(f"{t[:label]:>{label + 1}}" for t in clean))
        lines.append("  layer " + "".join(f"{t[:label]:>{label + 1}}" for t in tokens))
        for layer, row in enumerate(residual):
            lines.append(f"  {layer:>5} " + "".join(f"{float(v):>{label + 1}.2f}" for v in row))
    return "\n".join(lines) + "\n"


def _document(result: Any, tokens: list[str], name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": name,
        "clean": {"text": args.clean, "logit_difference": result.clean},
        "corrupted": {"text": args.corrupted, "logit_difference": result.corrupted, "tokens": tokens},
        "answer": args.answer,
        "wrong": args.wrong,
        "heads": result.heads,
        "heads_restored": result.restored(result.heads),
        "residual": None if args.no_residual else result.residual,
        "residual_restored": None if args.no_residual else result.restored(result.residual),
    }


def _plot(result: Any, tokens: list[str], folder: Path, args: argparse.Namespace) -> None:
    from selfattention.viz.grid import plot_grid

    make_folder(folder)
    title = f"patching {args.answer!r} vs {args.wrong!r}: fraction restored"
    plot_grid(result.restored(result.heads), folder / "patch_heads.png", title=title + " per head", centered=True)
    if not args.no_residual:
        plot_grid(
            result.restored(result.residual),
            folder / "patch_residual.png",
            title=title + " per position",
            column_labels=tokens,
            column_name="position patched",
            centered=True,
        )
