"""Reading the data a viewer page carries, for the tests of the page (tests/viz)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import torch


def page_data(page: str) -> dict[str, Any]:
    """The JSON block of a page written by ``to_html``."""
    match = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def decode(matrix: dict[str, Any]) -> torch.Tensor:
    """A float32 matrix as the page stores it: base64 of little-endian bytes, and its shape."""
    raw = bytearray(base64.b64decode(matrix["f32"]))
    return torch.frombuffer(raw, dtype=torch.float32).reshape(matrix["shape"])


def tiny_head(t: int = 2) -> dict[str, list[list[float]]]:
    """One head's matrices, all the identity of size t."""
    eye = [[1.0 if i == j else 0.0 for j in range(t)] for i in range(t)]
    return {"query": eye, "key": eye, "value": eye, "scores": eye, "weights": eye, "context": eye}
