"""The command line: parses arguments, calls the library, formats the results. No math lives here.

Each command is a module with ``register(subparsers)``, which adds its parser and sets ``run(args) -> int``
as its default ``func``. Bad input raises :class:`UsageError` (or ``ValueError``/``TypeError``/``OSError``
from the library), which :func:`main` prints as one line and turns into exit code 2, without a traceback.

How it behaves:

- ``selfattention`` alone prints the help, which lists the commands, and exits with 0 (asking for nothing is
  not an error; ``selfattention --help`` does the same).
- ``selfattention --version`` prints ``selfattention X.Y.Z``.
- An option a command does not know (``explain --qurey``) prints *that command's* usage, the unknown
  arguments and the closest known option (``did you mean --query?``), and exits with 2.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence

from selfattention import __version__
from selfattention.cli import context, explain, generate, heads, patch, train, view
from selfattention.cli.errors import UsageError

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|not enough memory", re.IGNORECASE)
"""How PyTorch's allocators word a failed allocation (a RuntimeError; CUDA's is torch.OutOfMemoryError)."""


def _allocation(error: BaseException) -> str:
    """What failed to be allocated, from PyTorch's message ("tried to allocate 256000000 bytes"), else the
    message itself on one line (at most 200 characters)."""
    text = " ".join(str(error).split())
    size = re.search(r"tried to allocate ([\d.,]+ ?[A-Za-z]*)", text, re.IGNORECASE)
    return f"could not allocate {size.group(1)}" if size else (text[:200] or type(error).__name__)


COMMANDS = [explain, train, generate, context, view, heads, patch]


def build_parser() -> argparse.ArgumentParser:
    """The ``selfattention`` parser with one subcommand per module in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="selfattention",
        description="Self-attention, step by step: the math, fast kernels, models and pictures.",
        epilog="`selfattention COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | None:
    """Parse ``argv``; ``None`` when no command was given. Unknown options are reported by their command."""
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return None
    if unknown:
        command = _subparser(parser, args.command)
        known = [option for action in command._actions for option in action.option_strings]
        hints = [
            f"did you mean {match[0]}?"
            for word in unknown
            if word.startswith("-") and (match := difflib.get_close_matches(word.split("=")[0], known, n=1))
        ]
        command.error("; ".join([f"unrecognized arguments: {' '.join(unknown)}", *hints]))
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("the parser has no subcommands")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted).

    Bad options exit through argparse (``SystemExit(2)`` after the command's usage); no command prints the
    help and returns 0.
    """
    parser = build_parser()
    args = _parse(parser, argv)
    if args is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (UsageError, ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"selfattention {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:  # an allocation that failed; any other RuntimeError is a bug
        if not isinstance(error, MemoryError) and not _OUT_OF_MEMORY.search(str(error)):
            raise
        print(f"selfattention {args.command}: error: out of memory: {_allocation(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selfattention {args.command}: interrupted", file=sys.stderr)
        return 130
