"""``selfattention generate``: continue a prompt with a trained GPT checkpoint."""

from __future__ import annotations

import argparse
import sys

from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.options import at_least, non_negative_number


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command."""
    parser = sub.add_parser(
        "generate",
        help="continue a prompt with a trained GPT",
        description="Continue PROMPT with the model in --checkpoint, decoding with a KV cache.",
    )
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--checkpoint", metavar="DIR", required=True, help="folder written by `train`")
    parser.add_argument("--max-new-tokens", type=at_least(0), default=200, help="tokens to add (default: 200)")
    parser.add_argument("--temperature", type=non_negative_number, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=at_least(1), default=None, help="sample among the K likeliest tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache")
    parser.add_argument(
        "--no-slide",
        action="store_true",
        help="fail when prompt + output exceed the context, instead of sliding the window",
    )
    add_device_argument(parser, note="; the same --seed samples the same way on every device")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the prompt and its continuation, streaming the new text as it is generated."""
    import torch

    from selfattention.generate import generate
    from selfattention.training.recipe import load_gpt

    device = resolve_device(args.device)
    model, tokenizer = load_gpt(args.checkpoint)
    model.to(device)
    if not args.prompt:
        raise ValueError("the prompt is empty; give at least one character")
    ids = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    new: list[int] = []
    shown = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal shown
        if not new:
            sys.stdout.write(args.prompt)  # only once the checks in generate() have passed
        new.append(int(token[0, 0]))
        text = tokenizer.decode(new)  # decode the whole tail: BPE tokens may split a character
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    generate(
        model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=generator,
        use_cache=not args.no_cache,
        slide=not args.no_slide,
        on_token=stream,
    )
    if not new:
        sys.stdout.write(args.prompt)
    sys.stdout.write(tokenizer.decode(new)[len(shown) :] + "\n")
    return 0
