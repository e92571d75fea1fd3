"""``selfattention explain``: walk through the four steps of attention on the worked example."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``explain`` command."""
    parser = sub.add_parser("explain", help="walk through attention step by step")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the walk-through."""
    raise NotImplementedError
