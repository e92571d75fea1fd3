"""``selfattention view``: write the interactive attention viewer to one self-contained HTML file, or serve it."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.options import model_name, seed, some_path
from selfattention.files import write_text

if TYPE_CHECKING:
    import torch

    from selfattention.viz.html import AttentionView

DEFAULT_OUT = "attention-view.html"
MAX_TOKENS = 512
"""The longest text the viewer shows: the page carries every head's T × T weights (512 words of the example:
6.8 MiB; 2000 words took 2.5 GB to build)."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``view`` command."""
    parser = sub.add_parser(
        "view",
        help="look at attention in the browser: one self-contained HTML page",
        description="Write an interactive attention viewer (tokens, lines as thick as the weights, every head, "
        "the numbers ω, α and z for the token under the mouse) as one HTML file that works offline, or serve "
        "it on 127.0.0.1. With no arguments: the worked example.",
    )
    parser.add_argument(
        "text", nargs="?", help=f"the text to look at, at most {MAX_TOKENS} tokens (default: the example's sentence)"
    )
    parser.add_argument(
        "--model",
        type=model_name,
        default="example",
        help="example (the worked example's embeddings, default), minilm (the pretrained encoder), "
        "smollm2 or FILE.gguf (a Llama-family language model), or a checkpoint folder of a trained GPT; "
        "layers are numbered from 0",
    )
    parser.add_argument(
        "--out", metavar="FILE.html", type=some_path, help=f"where to write the page (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 until Ctrl-C")
    parser.add_argument("--port", type=int, help="port for --serve (default: 8000; 0 = any free)")
    parser.add_argument("--heads", type=int, help="heads of the example's random layer (default: 4)")
    parser.add_argument("--causal", action="store_true", help="example: mask future tokens")
    parser.add_argument("--seed", type=seed, help="example: seed of the random projections (default: 123)")
    parser.add_argument(
        "--cache",
        choices=["full", "window", "sinks"],
        help="show the last step of TEXT streamed one token at a time through this KV cache (smollm2, FILE.gguf "
        "or a rotary checkpoint folder): the sinks marked, the evicted tokens as one marker",
    )
    parser.add_argument("--window", type=int, help="with --cache: latest tokens kept (default: the context)")
    parser.add_argument("--sinks", type=int, help="with --cache sinks: first tokens kept (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, help="with --cache: first continue TEXT greedily (default: 0)")
    add_device_argument(parser, note="; with a model, not the example")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the page; write it, serve it, or both."""
    from selfattention.viz.sources import model_view

    _check_options(args)
    if args.model == "example" and args.device != "cpu":
        raise UsageError(f"--device {args.device} is only used with a model (minilm, smollm2, FILE.gguf, a checkpoint)")
    device = resolve_device(args.device)  # before anything is read: a missing GPU is said at once
    if args.model == "example" and args.text and len(args.text.split()) > MAX_TOKENS:
        _too_long(len(args.text.split()))
    try:
        if args.cache is not None:
            view = _streaming_view(args, device)
        else:
            heads, seed = 4 if args.heads is None else args.heads, 123 if args.seed is None else args.seed
            view = model_view(args.model, args.text, num_heads=heads, causal=args.causal, seed=seed, device=device)
    except ImportError as error:  # an optional model whose packages are not installed: say what to install
        raise ValueError(str(error)) from error
    if len(view.tokens) > MAX_TOKENS:
        _too_long(len(view.tokens))
    page = view.to_html()
    heads = sum(len(layer) for layer in view.layers)
    summary = f"{len(view.tokens)} tokens, {len(view.layers)} layers, {heads} heads, {len(page) / 1024:.0f} KiB"
    if args.out or not args.serve:
        out = args.out or DEFAULT_OUT
        write_text(out, page)
        print(f"wrote {out} ({summary}); open it in a browser, no network needed")
    if args.serve:
        serve(page, 8000 if args.port is None else args.port, summary)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that the chosen page does not use, instead of ignoring them."""
    unused = []
    if args.cache is None:
        unused += [
            (name, "--cache") for name in ("window", "sinks", "max_new_tokens") if getattr(args, name) is not None
        ]
    if args.port is not None and not args.serve:
        unused.append(("port", "--serve"))
    if args.model != "example":
        unused += [(name, "--model example") for name in ("heads", "seed") if getattr(args, name) is not None]
        unused += [("causal", "--model example")] if args.causal else []
    if unused:
        name, needs = unused[0]
        raise UsageError(f"--{name.replace('_', '-')} is only used with {needs}")


def _too_long(tokens: int) -> None:
    raise UsageError(
        f"the text has {tokens} tokens; the viewer shows at most {MAX_TOKENS} (its page grows with the square "
        "of the length): view a shorter passage, or split the text and view each part"
    )


def serve(page: str, port: int, summary: str) -> None:
    """Serve ``page`` on 127.0.0.1 until interrupted."""
    from selfattention.viz.serve import make_server

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    server = make_server(page, port=port)
    host, bound = server.server_address[:2]
    print(f"serving http://{host!s}:{bound}/ ({summary}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


def _streaming_view(args: argparse.Namespace, device: torch.device) -> AttentionView:
    """``--cache``: the prompt (and a greedy continuation) streamed through the cache; its last step."""
    import torch

    from selfattention import examples
    from selfattention.cli.generate import cache_policy
    from selfattention.cli.models import load_causal, model_kind
    from selfattention.generate import generate
    from selfattention.viz.html import piece_labels
    from selfattention.viz.stream_view import streaming_view

    policy = cache_policy(args.cache, args.window, args.sinks)
    if model_kind(args.model) not in ("gguf", "checkpoint"):
        raise ValueError(f"--cache views a language model (smollm2, FILE.gguf or a checkpoint), not {args.model!r}")
    new_tokens = args.max_new_tokens or 0
    if new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be at least 0, got {new_tokens}")
    lm = load_causal(args.model)
    lm.model.to(device)
    ids = lm.encode(" ".join(examples.TOKENS) if args.text is None else args.text)
    prompt = torch.tensor([ids], device=device)
    stream = generate(lm.model, prompt, new_tokens, temperature=0.0, cache=policy)[0]
    pieces = piece_labels(lm.decode, stream)
    return streaming_view(lm.model, stream, pieces, policy, title=lm.name)
