"""The command line: parses arguments, calls the library, formats the results. No math lives here.

Each command is a module with ``register(subparsers)``, which adds its parser and sets ``run(args) -> int``
as its default ``func``. Bad input raises :class:`UsageError` (or ``ValueError``/``TypeError``/``OSError``
from the library), which :func:`main` prints as one line and turns into exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from selfattention.cli import context, explain, generate, train, view
from selfattention.cli.errors import UsageError

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

COMMANDS = [explain, train, generate, context, view]


def build_parser() -> argparse.ArgumentParser:
    """The ``selfattention`` parser with one subcommand per module in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="selfattention",
        description="Self-attention, step by step: the math, fast kernels, models and pictures.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"selfattention {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selfattention {args.command}: interrupted", file=sys.stderr)
        return 130
