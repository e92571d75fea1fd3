"""``selfattention explain --model DIR|smollm2|FILE.gguf "text"``: the attention weights a causal model gives text.

``explain`` calls :func:`add_checkpoint_arguments` on its parser and hands over to
:func:`explain_checkpoint` when ``--checkpoint`` is given. The weights are read through
:func:`selfattention.capture`, the same inspection path as for any module of the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from selfattention.cli.device import resolve_device
from selfattention.cli.options import json_text, model_name
from selfattention.viz.html import piece_labels


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--checkpoint``; ``text``, ``--layer``, ``--head``, ``--plot`` and ``--format`` are ``explain``'s own.

    With ``--checkpoint``, ``--layer`` is 0-based and defaults to the last layer; ``--head`` is 0-based.
    """
    parser.add_argument(
        "--checkpoint",
        type=model_name,
        metavar="DIR",
        help="a trained GPT (folder written by `train`); layers 0-based, default last",
    )
    parser.add_argument(
        "--logit-lens",
        action="store_true",
        help="with a causal --model or --checkpoint: the next token each layer's residual stream predicts",
    )


def checkpoint_weights(
    directory: str, text: str, layer: int | None, head: int, device: Any = "cpu"
) -> tuple[list[str], Tensor, str]:
    """The tokens of ``text``, the weights α ``(T, T)`` of one head (on the CPU), and a description of where
    they come from.

    ``directory`` is a checkpoint folder, ``smollm2`` or a ``.gguf`` file (any causal language model), run on
    ``device``.

    Raises:
        ValueError: an empty text or one longer than the context, characters the tokenizer does not know,
            or a layer or head out of range (naming the valid range).
    """
    import torch

    from selfattention.cli.models import load_causal
    from selfattention.inspect import capture

    if not text:
        raise ValueError(f'give the text to explain, e.g. explain {_option(directory)} {directory} "To be, or not"')
    lm = load_causal(directory)
    model, config = lm.model.to(device), lm.model.config
    layer = config.num_layers - 1 if layer is None else layer
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"--layer {layer} out of range: the model has layers 0 to {config.num_layers - 1}")
    if not 0 <= head < config.num_heads:
        raise ValueError(f"--head {head} out of range: the model has heads 0 to {config.num_heads - 1}")
    ids = lm.encode(text)
    if len(ids) > config.context_length:
        raise ValueError(f"the text has {len(ids)} tokens, more than the context of {config.context_length}")
    with torch.no_grad(), capture(model) as cap:
        model(torch.tensor([ids], dtype=torch.long, device=device))
    weights = cap[f"blocks.{layer}.attn"].head(head).weights[0].cpu()  # (1, T, T) -> (T, T)
    where = f"layer {layer} of {config.num_layers}, head {head} of {config.num_heads}"
    return piece_labels(lm.decode, ids), weights, where


def _option(spec: str) -> str:
    """The option that names ``spec`` on the command line: ``--model`` for a name or a GGUF file."""
    return "--checkpoint" if Path(spec).is_dir() else "--model"


def explain_checkpoint(args: argparse.Namespace) -> int:
    """Print, for each token of ``args.text``, the earlier tokens it attends to most; optionally plot α.

    Reads ``args.checkpoint``, ``args.text``, ``args.layer``, ``args.head``, and, when present,
    ``args.plot`` (a PNG path) and ``args.format`` (``"json"``: tokens and the full α as JSON).
    """
    if getattr(args, "logit_lens", False):
        from selfattention.cli.explain_lens import explain_lens

        return explain_lens(args)
    device = resolve_device(getattr(args, "device", "cpu"))
    tokens, weights, where = checkpoint_weights(args.checkpoint, args.text or "", args.layer, args.head, device)
    if getattr(args, "format", "text") == "json":
        sys.stdout.write(json_text({"where": where, "tokens": tokens, "weights": weights}, indent=None))
        _plot(args, tokens, weights, where, announce=False)
        return 0
    lines = [
        f"attention weights α of {where} ({args.checkpoint})",
        "each token, then the three earlier tokens (position:token) it attends to most",
        "",
    ]
    width = max(len(t) for t in tokens)
    for i, label in enumerate(tokens):
        row = weights[i, : i + 1]
        top = row.topk(min(3, i + 1))
        parts = [f"{j}:{tokens[j]} {float(w):.2f}" for w, j in zip(top.values, top.indices.tolist(), strict=True)]
        lines.append(f"{i:>3} {label:<{width}}  -> " + ", ".join(parts))
    sys.stdout.write("\n".join(lines) + "\n")
    _plot(args, tokens, weights, where, announce=True)
    return 0


def _plot(args: argparse.Namespace, tokens: list[str], weights: Tensor, where: str, *, announce: bool) -> None:
    plot = getattr(args, "plot", None)
    if plot:
        from selfattention.viz.heatmap import plot_weights

        plot_weights(weights, tokens, tokens, plot, title=f"α, {where}")
        if announce:
            print(f"\nheatmap of α written to {plot}")
