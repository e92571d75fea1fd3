"""``selfattention generate``: continue a prompt with a language model: a trained GPT, SmolLM2 or a GGUF file."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfattention.kv_cache import CachePolicy

from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.models import KINDS, load_causal, model_kind, refuse
from selfattention.cli.options import at_least, model_name, non_negative_number, seed


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command."""
    parser = sub.add_parser(
        "generate",
        help="continue a prompt with a language model (a trained GPT, SmolLM2, a GGUF file)",
        description="Continue PROMPT with the model given by --model (smollm2, FILE.gguf or a checkpoint folder "
        "written by `train`), decoding with a KV cache.",
    )
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--model", type=model_name, metavar="MODEL", help=f"{KINDS}; language models only")
    parser.add_argument(
        "--checkpoint", type=model_name, metavar="DIR", help="folder written by `train` (the same as --model DIR)"
    )
    parser.add_argument("--max-new-tokens", type=at_least(0), default=200, help="tokens to add (default: 200)")
    parser.add_argument("--temperature", type=non_negative_number, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=at_least(1), default=None, help="sample among the K likeliest tokens")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the sampling (default: 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache")
    parser.add_argument(
        "--chat", action="store_true", help="wrap PROMPT in the model's chat template (GGUF files that have one)"
    )
    parser.add_argument(
        "--no-slide",
        action="store_true",
        help="a trained GPT: fail when prompt + output exceed the context, instead of sliding the window "
        "(GGUF models never slide: they fail)",
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
    add_device_argument(parser, note="; the same --seed samples the same way on every device")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the prompt and its continuation, streaming the new text as it is generated."""
    import torch

    from selfattention.generate import generate

    device = resolve_device(args.device)  # before anything is read: a missing GPU is said at once
    policy = cache_policy(args.cache, args.window, args.sinks)
    if args.no_cache and policy.kind != "full":
        raise UsageError(f"--cache {policy.kind} keeps a rolling cache; it cannot be used with --no-cache")
    if args.model and args.checkpoint:
        raise UsageError("choose one of --model NAME and --checkpoint DIR")
    if not (args.model or args.checkpoint):
        raise UsageError("give the model: --model smollm2, --model FILE.gguf or --model CHECKPOINT_DIR")
    spec = args.model or args.checkpoint
    kind = model_kind(spec)
    refuse(
        "generate", spec, kind, ("gguf", "checkpoint"), "it is not a language model (give smollm2, FILE.gguf or DIR)"
    )
    if not args.prompt:
        raise ValueError("the prompt is empty; give at least one character")
    lm = load_causal(spec)
    lm.model.to(device)
    prompt = args.prompt
    if args.chat:
        if lm.chat is None:
            raise UsageError(f"--chat: {lm.name} has no chat template")
        prompt = lm.chat(prompt)
    ids = torch.tensor([lm.encode(prompt)], dtype=torch.long, device=device)
    total, context = ids.shape[1] + args.max_new_tokens, int(lm.model.config.context_length)
    slides = kind == "checkpoint" and not args.no_slide
    if policy.kind == "full" and total > context and not slides:  # said with the options, not generate()'s names
        ways = "stream past the context with --cache window or --cache sinks"
        ways = f"drop --no-slide, or {ways} (a --rope checkpoint)" if kind == "checkpoint" else ways
        raise UsageError(
            f"the prompt ({ids.shape[1]} tokens) + --max-new-tokens ({args.max_new_tokens}) = {total} exceeds the "
            f"context of {context}; shorten them, or {ways}"
        )
    generator = torch.Generator().manual_seed(args.seed)
    shown_prompt = args.prompt + "\n" if args.chat else args.prompt
    new: list[int] = []
    shown = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal shown
        if not new:
            sys.stdout.write(shown_prompt)  # only once the checks in generate() have passed
        new.append(int(token[0, 0]))
        if new[-1] == lm.eos_token_id:
            return
        text = lm.decode(new)  # decode the whole tail: BPE tokens may split a character
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    generate(
        lm.model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=generator,
        use_cache=not args.no_cache,
        slide=kind == "checkpoint" and not args.no_slide,
        on_token=stream,
        eos_token_id=lm.eos_token_id,
        cache=policy,
    )
    if not new:
        sys.stdout.write(shown_prompt)
    if new and new[-1] == lm.eos_token_id:
        new.pop()
    sys.stdout.write(lm.decode(new)[len(shown) :] + "\n")
    return 0


def cache_policy(kind: str, window: int | None, sinks: int | None) -> CachePolicy:
    """The cache policy of the flags; ``--window`` and ``--sinks`` only where they apply."""
    from selfattention.kv_cache import CachePolicy

    if kind == "full" and window is not None:
        raise ValueError("--window applies to --cache window or sinks, not full")
    if kind != "sinks" and sinks is not None:
        raise ValueError(f"--sinks applies to --cache sinks, not {kind}")
    return CachePolicy(kind, window=window, sinks=4 if sinks is None else sinks)
