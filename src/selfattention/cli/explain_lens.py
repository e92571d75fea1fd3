"""``selfattention explain --model M "TEXT" --logit-lens``: per layer, the next token the residual stream predicts.

``explain`` hands over here from :func:`selfattention.cli.explain_checkpoint.explain_checkpoint` when
``--logit-lens`` is given with a causal language model (``smollm2``, a ``.gguf`` file or a checkpoint folder).
The predictions come from :func:`selfattention.lens.logit_lens`: the final norm and the output head applied to
the residual stream after each layer.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from selfattention.cli.device import resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.options import json_text

SHOWN = 3  # predictions listed per layer for the last position
UNUSED = {"layer": None, "head": 0, "plot": None, "query": None, "all": False, "projections": None}
"""``explain``'s options that the lens does not read, with their defaults: given, they are refused, not ignored
(``--layer 99`` and ``--plot l.png`` were accepted and did nothing)."""


def _check_unused(args: argparse.Namespace) -> None:
    typed = [f"--{name}" for name, default in UNUSED.items() if getattr(args, name, default) != default]
    if typed:
        raise UsageError(f"{typed[0]} does not apply with --logit-lens, which reads every layer at every position")


def explain_lens(args: argparse.Namespace) -> int:
    """Print the top prediction of every layer at every position of ``args.text``, and the top 3 at the last."""
    import torch

    from selfattention.cli.models import load_causal
    from selfattention.lens import logit_lens, top_predictions
    from selfattention.viz.html import piece_labels

    _check_unused(args)
    device = resolve_device(getattr(args, "device", "cpu"))
    lm = load_causal(args.checkpoint)
    if not args.text:
        raise ValueError('give the text to read, e.g. explain --model smollm2 "The capital of France is" --logit-lens')
    ids = lm.encode(args.text)
    lens = logit_lens(lm.model.to(device).eval(), torch.tensor([ids], device=device))[:, 0].cpu()  # (L, T, V)
    probs, top = top_predictions(lens, SHOWN)  # (L, T, k)
    tokens = piece_labels(lm.decode, ids)

    def label(token_id: Any) -> str:
        return piece_labels(lm.decode, [token_id])[0]

    if getattr(args, "format", "text") == "json":
        layers = [
            [{"tokens": [label(t) for t in top[layer, i]], "probabilities": probs[layer, i]} for i in range(len(ids))]
            for layer in range(top.shape[0])
        ]
        sys.stdout.write(json_text({"model": lm.name, "tokens": tokens, "layers": layers}, indent=None))
        return 0
    width = max(8, *(len(t) + 1 for t in tokens))
    lines = [
        f"logit lens of {lm.name}: the most likely next token read from the residual stream after each layer",
        "(final norm and output head applied to it; the last layer is the model's own prediction)",
        "",
        "layer " + "".join(f"{t[: width - 1]:>{width}}" for t in tokens),
    ]
    for layer in range(top.shape[0]):
        lines.append(f"{layer:>5} " + "".join(f"{label(t)[: width - 1]:>{width}}" for t in top[layer, :, 0]))
    lines += ["", f'after the last token "{tokens[-1]}", the top {SHOWN} per layer (probability):']
    for layer in range(top.shape[0]):
        cells = [f"{label(t)} {float(p):.2f}" for t, p in zip(top[layer, -1], probs[layer, -1], strict=True)]
        lines.append(f"{layer:>5}  " + ", ".join(cells))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
