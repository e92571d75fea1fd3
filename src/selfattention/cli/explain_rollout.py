"""``selfattention explain --model M "TEXT" --rollout [--flow]``: what each token draws on through all the layers.

``explain`` calls :func:`add_rollout_arguments` on its parser and hands over to :func:`explain_rollout` when
``--rollout`` or ``--flow`` is given. The weights of every layer are read through :func:`selfattention.capture`;
the math is in :mod:`selfattention.rollout` (Abnar and Zuidema, 2020). ``--layer`` (0-based, default the last)
is the layer up to which the rollout is shown; the flow always runs through every layer.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor

from selfattention.cli.device import resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.options import json_text
from selfattention.inspect import capture
from selfattention.rollout import MAX_FLOW_TOKENS, attention_flow, attention_rollout

SHOWN = 3  # input tokens listed per output token


def add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--rollout`` and ``--flow`` (with ``--model``; ``TEXT``, ``--layer``, ``--plot``, ``--format`` are
    ``explain``'s own)."""
    parser.add_argument(
        "--rollout",
        action="store_true",
        help="with --model: attention rollout through the layers (residual as 0.5·α + 0.5·I, heads averaged)",
    )
    parser.add_argument(
        "--flow",
        action="store_true",
        help=f"with --model: attention flow too (maximum flow through the layers; at most {MAX_FLOW_TOKENS} tokens)",
    )


def model_weights(spec: str, text: str | None, device: str = "cpu") -> tuple[str, list[str], list[Tensor]]:
    """The model's name, the tokens of ``text`` and every layer's α ``(H, T, T)``, read through capture().

    ``spec`` is ``minilm`` (``text`` defaults to the walk-through's sentence), ``smollm2``, a ``.gguf`` file or
    a checkpoint folder.

    Raises:
        UsageError: no text for a language model, or a kind of model without layers (``example``).
        ValueError: a text longer than the model's context (from the model).
    """
    from selfattention.cli.models import load_causal, model_kind

    kind = model_kind(spec)
    if kind == "example":
        raise UsageError("--rollout and --flow need a model with layers: --model minilm, smollm2, FILE.gguf or DIR")
    if kind == "encoder":
        from selfattention.cli.explain_model import DEFAULT_TEXT
        from selfattention.cli.pretrained_models import load_model

        encoder = load_model(spec, resolve_device(device))
        sentence = DEFAULT_TEXT if text is None else text
        with capture(encoder.encoder) as cap:
            encoded = encoder.encode([sentence])
        layers = [record.weights[0].cpu() for _, record in cap.items()]  # each (1, H, T, T) -> (H, T, T)
        return encoder.name, encoded.batch.tokens(0), layers
    if not text:
        raise UsageError(f'give the text, e.g. explain --model {spec} "The capital of France" --rollout')
    from selfattention.viz.html import piece_labels

    where = resolve_device(device)
    lm = load_causal(spec)
    ids = lm.encode(text)
    context = lm.model.config.context_length
    if len(ids) > context:
        raise ValueError(f"the text has {len(ids)} tokens, more than the context of {context}")
    with torch.no_grad(), capture(lm.model.to(where)) as cap:
        lm.model(torch.tensor([ids], dtype=torch.long, device=where))
    layers = [record.weights[0].cpu() for _, record in cap.items()]
    return lm.name, piece_labels(lm.decode, ids), layers


def explain_rollout(args: argparse.Namespace) -> int:
    """Print the rollout up to ``args.layer`` (and with ``args.flow`` the flow) of ``args.model`` on ``args.text``."""
    if not args.model:
        raise UsageError("--rollout and --flow need --model minilm, smollm2, FILE.gguf or a CHECKPOINT_DIR")
    name, tokens, layers = model_weights(args.model, args.text, getattr(args, "device", "cpu"))
    count = len(layers)
    layer = count - 1 if args.layer is None else args.layer
    if not 0 <= layer < count:
        raise UsageError(f"--layer {layer} is out of range: the model has layers 0-{count - 1}")
    if args.flow and len(tokens) > MAX_FLOW_TOKENS:
        raise UsageError(
            f"--flow is limited to {MAX_FLOW_TOKENS} tokens (one maximum-flow problem per pair); the text has "
            f"{len(tokens)}: shorten it or use --rollout alone"
        )
    rolled = attention_rollout(layers)[layer]  # (T, T)
    flow = attention_flow(layers) if args.flow else None  # (T, T), through every layer
    where = f"{name}, layers 0-{layer} of {count}"
    if getattr(args, "plot", None):
        from selfattention.viz.heatmap import plot_weights

        plot_weights(rolled, tokens, tokens, args.plot, title=f"attention rollout, {where}")
    if getattr(args, "format", "text") == "json":
        document = {"model": name, "layer": layer, "tokens": tokens, "rollout": rolled, "flow": flow}
        sys.stdout.write(json_text(document, indent=None))
        return 0
    lines = [
        f"attention rollout of {where} (Abnar and Zuidema 2020: each layer 0.5·α + 0.5·I, heads averaged,",
        "multiplied from the first layer up); each token, then the input tokens it draws on most (rows sum to 1)",
        "",
    ]
    lines += _top_lines(tokens, rolled)
    lines += ["", f"share of the first token ({tokens[0]}) in each token's rollout: " + _first_share(rolled)]
    if flow is not None:
        lines += [
            "",
            f"attention flow through all {count} layers (maximum flow from each output token to each input token,",
            "networkx; shown as shares of the row's total)",
            "",
        ]
        lines += _top_lines(tokens, flow / flow.sum(dim=-1, keepdim=True))
    sys.stdout.write("\n".join(lines) + "\n")
    if getattr(args, "plot", None):
        print(f"\nheatmap of the rollout written to {args.plot}")
    return 0


def _top_lines(tokens: list[str], rows: Tensor) -> list[str]:
    width = max(len(t) for t in tokens)
    lines = []
    for i, (label, row) in enumerate(zip(tokens, rows, strict=True)):
        top = row.topk(min(SHOWN, row.numel()))
        pairs = zip(top.values, top.indices.tolist(), strict=True)
        parts = [f"{j}:{tokens[j]} {float(w):.2f}" for w, j in pairs if w > 0]  # masked (later) tokens: 0
        lines.append(f"{i:>3} {label:<{width}}  <- " + ", ".join(parts))
    return lines


def _first_share(rolled: Tensor) -> str:
    shares = rolled[:, 0]
    return f"mean {float(shares.mean()):.2f}, last token {float(shares[-1]):.2f}"
