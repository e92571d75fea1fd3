"""``--device``: where a command runs its model (the CPU unless CUDA is asked for)."""

from __future__ import annotations

import argparse

import torch

from selfattention.cli.errors import UsageError


def add_device_argument(parser: argparse.ArgumentParser, *, note: str = "") -> None:
    """Add ``--device {cpu,cuda,cuda:N}`` (default cpu) to ``parser``."""
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help=f"cpu (default), cuda or cuda:N{note}",
    )


def resolve_device(name: str) -> torch.device:
    """The torch device called ``name``: ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UsageError: any other name, or CUDA asked for where there is none (or not that many GPUs).
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "found no GPU"
        raise UsageError(
            f"--device {name}: CUDA is not available (torch {torch.__version__} {built}); use --device cpu"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: there are {count} CUDA device(s), numbered 0-{count - 1}")
    return device
