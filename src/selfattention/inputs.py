"""Reading token embeddings from files (``.json``, ``.csv``, ``.npy``) and checking them.

Formats:

* ``.json``: ``{"tokens": ["Your", ...], "embeddings": [[0.43, 0.15, 0.89], ...]}``
* ``.csv``: one row per token, the token in the first column and its vector in the others; a header row is
  allowed (recognised because its other columns are not numbers).
* ``.npy``: a ``(T, C)`` float array; the tokens come separately (``--tokens``, split on whitespace).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from selfattention.files import read_json

FLOAT32_MAX = torch.finfo(torch.float32).max


def check_embeddings(tokens: Sequence[str], rows: Sequence[Sequence[float]], source: str = "embeddings") -> Tensor:
    """Turn ``rows`` into a ``(T, C)`` float32 tensor after checking them against ``tokens``.

    Raises:
        ValueError: empty input, ragged rows, a non-number, NaN/inf, or a token count that differs from the
            number of rows — each naming the offending values.
    """
    if len(rows) == 0:
        raise ValueError(f"{source}: no embeddings (need at least one row)")
    width = len(rows[0])
    if width == 0:
        raise ValueError(f"{source}: row 0 ({tokens[0] if tokens else '?'}) is empty")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"{source}: ragged embeddings: row 0 has {width} values but row {i} has {len(row)}")
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{source}: row {i}, column {j} is not a number: {str(value)[:40]!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{source}: row {i}, column {j} is {value} (values must be finite)")
            if abs(value) > FLOAT32_MAX:  # an int of 500 digits too: compared exactly, never converted
                shown = f"{value:.3g}" if isinstance(value, float) else f"an integer of {len(str(abs(value)))} digits"
                raise ValueError(
                    f"{source}: row {i}, column {j} is {shown}, beyond the float32 range (±{FLOAT32_MAX:.3g})"
                )
    if len(tokens) != len(rows):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(rows)} embedding rows")
    if any(not str(token) for token in tokens):
        raise ValueError(f"{source}: empty token at position {[str(t) for t in tokens].index('')}")
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float32)


def load_embeddings(path: str | os.PathLike[str], tokens: Sequence[str] | None = None) -> tuple[list[str], Tensor]:
    """Read tokens and their embeddings from ``path`` (format chosen by the file extension).

    Args:
        path: a ``.json``, ``.csv`` or ``.npy`` file (see the module docstring).
        tokens: the tokens for a ``.npy`` file (required there, not allowed for the others).

    Returns:
        ``(tokens, embeddings (T, C))``.

    Raises:
        ValueError: an unknown extension, a malformed file, or bad values. OSError: an unreadable file.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".json", ".csv", ".npy"):
        raise ValueError(f"{file}: unknown embeddings format {suffix or '(no extension)'!r}; use .json, .csv or .npy")
    if suffix != ".npy" and tokens is not None:
        raise ValueError(f"{file}: tokens are read from the file itself; --tokens is only for .npy files")
    if suffix == ".json":
        return _load_json(file)
    if suffix == ".csv":
        return _load_csv(file)
    return _load_npy(file, tokens)


def _load_json(file: Path) -> tuple[list[str], Tensor]:
    data = read_json(file)
    if not isinstance(data, dict) or "tokens" not in data or "embeddings" not in data:
        raise ValueError(f'{file}: expected an object {{"tokens": [...], "embeddings": [[...], ...]}}')
    tokens, rows = data["tokens"], data["embeddings"]
    if not isinstance(tokens, list) or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{file}: 'tokens' must be a list and 'embeddings' a list of lists")
    return [str(t) for t in tokens], check_embeddings(tokens, rows, str(file))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _load_csv(file: Path) -> tuple[list[str], Tensor]:
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            lines = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}: not a UTF-8 text file ({error.reason})") from None
    except csv.Error as error:  # a field over csv.field_size_limit() (131072 characters), a NUL byte...
        raise ValueError(f"{file}: not a readable CSV file ({error})") from None
    if lines and all(_number(cell) is None for cell in lines[0][1:]):
        lines = lines[1:]  # a header row
    tokens, rows = [], []
    for number, line in enumerate(lines):
        tokens.append(line[0].strip())
        row = []
        for column, cell in enumerate(line[1:], start=1):
            value = _number(cell)
            if value is None:
                raise ValueError(f"{file}: row {number}, column {column} is not a number: {cell!r}")
            row.append(value)
        rows.append(row)
    return tokens, check_embeddings(tokens, rows, str(file))


def _load_npy(file: Path, tokens: Sequence[str] | None) -> tuple[list[str], Tensor]:
    import numpy as np

    if tokens is None:
        raise ValueError(f"{file}: a .npy file holds no tokens; pass them with --tokens")
    _check_npy_header(file)
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, EOFError) as error:
        raise ValueError(f"{file}: not a readable .npy array ({error or 'the file ends early'})") from None
    if np.iscomplexobj(array):
        raise ValueError(f"{file}: complex values ({array.dtype}) are not embeddings; save the real part")
    real = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.ndim != 2 or not real:
        raise ValueError(f"{file}: expected a 2-d numeric array (tokens × width), got {array.ndim}-d {array.dtype}")
    return list(tokens), check_embeddings(list(tokens), array.astype(float).tolist(), str(file))


def _check_npy_header(file: Path) -> None:
    """Refuse a file whose ``.npy`` header is unreadable or promises more (or fewer) bytes than the file has.

    Checked before ``np.load`` so that a damaged header can neither raise an unexpected exception type nor
    make numpy allocate what the header claims.
    """
    import numpy as np

    fmt = np.lib.format
    try:
        with file.open("rb") as handle:
            if handle.read(4) == b"PK\x03\x04":  # np.load would read a zip (.npz) whatever the extension
                raise ValueError("a .npz archive, not a .npy array")
            handle.seek(0)
            version = fmt.read_magic(handle)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(handle)
            available = file.stat().st_size - handle.tell()
    except Exception as error:  # numpy's header parser raises many types (SyntaxError, TokenError...) on garbage
        raise ValueError(f"{file}: not a readable .npy array ({str(error)[:100] or 'the file ends early'})") from None
    needed = math.prod(shape) * dtype.itemsize
    if needed != available:
        raise ValueError(
            f"{file}: its header promises shape {shape} of {dtype} ({needed:,} bytes) but {available:,} bytes follow "
            "(truncated or corrupt?)"
        )
