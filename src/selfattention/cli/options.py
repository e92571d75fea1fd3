"""What the commands share: option types that name the option in their errors, and JSON at float32 precision.

Option types are for ``add_argument(type=...)``: a bad value makes argparse print the subcommand's usage and
``argument --steps: must be at least 1, got 0``, exit code 2, so the message names the option as typed.

JSON numbers: the library computes in float32, whose 24-bit mantissa holds 7 to 8 significant digits. A
float32 value printed as a Python float shows the noise of its binary expansion (``0.4300000071525574``);
:func:`json_text` writes each number as the shortest decimal that reads back as the same float32 (``0.43``),
as ``repr`` does for float64. Reading the JSON into float32 gives back exactly the computed values.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from selfattention.viz.figures import figure_format

__all__ = [
    "at_least",
    "figure_path",
    "float32_number",
    "json_text",
    "non_negative_number",
    "positive_number",
    "probability",
    "seed",
    "some_path",
]


def at_least(minimum: int, maximum: int | None = None) -> Any:
    """An argparse type: an integer no smaller than ``minimum`` (and no larger than ``maximum``, if given).

    >>> at_least(1)("3")
    3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be between {minimum} and {maximum}, got {value}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}" if maximum is None else f"integer in [{minimum}, {maximum}]"
    return parse


SEEDS = (-(1 << 63), (1 << 64) - 1)
"""The seeds :func:`torch.manual_seed` takes."""


def seed(text: str) -> int:
    """An argparse type: a whole number that :func:`torch.manual_seed` takes.

    >>> seed("123")
    123
    """
    return int(at_least(*SEEDS)(text))


def some_path(text: str) -> str:
    """An argparse type for a file or folder to write: any path but an empty one (which would mean the
    current folder, or be ignored).

    >>> some_path("out")
    'out'
    """
    return _non_empty(text, "a path")


def model_name(text: str) -> str:
    """An argparse type for ``--model``/``--checkpoint``/``--embeddings``: a name or a path, never an empty
    one (which fell back to the default, or read the current folder).

    >>> model_name("smollm2")
    'smollm2'
    """
    return _non_empty(text, "a model name or a path")


def _non_empty(text: str, expected: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return text


def _number(text: str, accepted: Callable[[float], bool], requirement: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not accepted(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a probability in [0, 1), such as a dropout rate.

    >>> probability("0.1")
    0.1
    """
    return _number(text, lambda value: 0.0 <= value < 1.0, "in [0, 1)")


def positive_number(text: str) -> float:
    """An argparse type: a finite number above zero, such as a learning rate.

    >>> positive_number("3e-4")
    0.0003
    """
    return _number(text, lambda value: math.isfinite(value) and value > 0, "a finite number above 0")


def non_negative_number(text: str) -> float:
    """An argparse type: a finite number of at least zero, such as a sampling temperature.

    >>> non_negative_number("0")
    0.0
    """
    return _number(text, lambda value: math.isfinite(value) and value >= 0, "a finite number >= 0")


def figure_path(text: str) -> str:
    """An argparse type for ``--plot FILE``: a path whose suffix names a figure format (png, svg, pdf, jpg).

    >>> figure_path("weights.svg")
    'weights.svg'
    """
    try:
        figure_format(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def float32_number(value: float) -> float:
    """The shortest decimal that is the same float32 as ``value``, as a Python float.

    >>> float32_number(0.4300000071525574)
    0.43
    """
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:  # beyond float32: kept as it is
        return value
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON has no NaN or infinity: refused rather than written invalid
            raise ValueError(f"the result holds a non-finite number ({value}), which JSON cannot hold")
        return float32_number(value)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    if hasattr(value, "tolist"):  # a tensor or an array: its numbers, then rounded
        return _rounded(value.tolist())
    return value


def json_text(document: Any, *, indent: int | None = 2) -> str:
    """``document`` as JSON text with every float written at float32 precision (see the module docstring).

    Tensors and arrays in ``document`` become nested lists. Ends with a newline.

    Raises:
        ValueError: a NaN or an infinity anywhere in ``document`` (JSON has neither).

    >>> json_text({"weights": [0.13849999010562897, 1.0]}, indent=None)
    '{"weights": [0.1385, 1.0]}\\n'
    """
    return json.dumps(_rounded(document), indent=indent, ensure_ascii=False) + "\n"
