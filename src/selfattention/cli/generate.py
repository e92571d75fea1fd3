"""``selfattention generate``: continue a prompt with a trained GPT checkpoint."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfattention.kv_cache import CachePolicy


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command."""
    parser = sub.add_parser(
        "generate",
        help="continue a prompt with a trained GPT",
        description="Continue PROMPT with the model in --checkpoint, decoding with a KV cache.",
    )
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--checkpoint", metavar="DIR", required=True, help="folder written by `train`")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache")
    parser.add_argument(
        "--no-slide",
        action="store_true",
        help="fail when prompt + output exceed the context, instead of sliding the window",
    )
    parser.add_argument(
        "--cache",
        choices=["full", "window", "sinks"],
        default="full",
        help="full: refill past the context; window: keep the last --window tokens; sinks: also keep the first "
        "--sinks tokens (StreamingLLM). window and sinks need a rotary model (default: full)",
    )
    parser.add_argument("--window", type=int, default=None, help="latest tokens kept (default: the context)")
    parser.add_argument("--sinks", type=int, default=None, help="first tokens kept with --cache sinks (default: 4)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the prompt and its continuation, streaming the new text as it is generated."""
    import torch

    from selfattention.generate import generate
    from selfattention.training.recipe import load_gpt

    policy = cache_policy(args.cache, args.window, args.sinks)
    model, tokenizer = load_gpt(args.checkpoint)
    if not args.prompt:
        raise ValueError("the prompt is empty; give at least one character")
    ids = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)
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
        cache=policy,
    )
    if not new:
        sys.stdout.write(args.prompt)
    sys.stdout.write(tokenizer.decode(new)[len(shown) :] + "\n")
    return 0


def cache_policy(kind: str, window: int | None, sinks: int | None) -> CachePolicy:
    """The cache policy of the flags; ``--window`` and ``--sinks`` only where they apply."""
    from selfattention.kv_cache import CachePolicy

    if kind == "full" and window is not None:
        raise ValueError("--window applies to --cache window or sinks, not full")
    if kind != "sinks" and sinks is not None:
        raise ValueError(f"--sinks applies to --cache sinks, not {kind}")
    return CachePolicy(kind, window=window, sinks=4 if sinks is None else sinks)
