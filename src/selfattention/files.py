"""Safe file handling: atomic, durable writes, and JSON reading that fails with one clear line.

A file written through :func:`atomic_path` is either its old self or complete, never half written, and it
survives a power loss once the call returns: the data is flushed and fsynced before the rename, and the
folder is fsynced after it (so the rename itself is on disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JSON_MAX_BYTES = 64 * 2**20
"""The largest JSON file :func:`read_json` reads (checkpoint configs hold a loss per step: 100k steps is 3 MB)."""


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a folder's data and metadata to disk (``os.fsync``); folders only on POSIX."""
    if Path(path).is_dir() and os.name != "posix":
        return  # Windows cannot open a folder to fsync it; its renames are journaled by NTFS
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (mode as a plain ``open()`` gives it), flushed and fsynced."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success make it durable and rename it over ``path``.

    On success the temporary file is fsynced, renamed over ``path`` with one ``os.replace``, and the folder
    is fsynced. On error (or an interrupt) the temporary file is removed and ``path`` is untouched.
    A symbolic link is followed (the file it names is replaced, the link stays), an existing file keeps
    its permission bits, and a target that exists but is not a regular file (``/dev/full``, a pipe) is
    refused rather than replaced.

    >>> with atomic_path("/tmp/out.txt") as tmp:
    ...     _ = tmp.write_text("done")
    """
    asked = Path(path)
    target = asked.resolve() if asked.is_symlink() else asked  # write through a link, as an editor does
    if target.parent and not target.parent.is_dir():
        raise OSError(f"cannot write {asked}: folder {target.parent} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {asked}: it is a folder")
    if target.exists() and not target.is_file():
        raise OSError(f"cannot write {asked}: it exists and is not a regular file (a device or a pipe)")
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:  # named by the path asked for, not the temporary one
        raise type(error)(f"cannot write {asked}: {error.strerror or error}") from None
    os.close(fd)
    tmp = Path(name)
    if mode is None:  # mkstemp makes 0600; give a new file the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    tmp.chmod(mode)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def make_folder(path: str | os.PathLike[str]) -> Path:
    """Create the folder ``path`` (and its parents) if missing; return it.

    Raises:
        FileExistsError: ``path`` is a file. OSError: it cannot be created, naming it.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise type(error)(f"cannot create the folder {folder}: {error.strerror or error}") from None
    return folder


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def parse_json(text: str, source: str | os.PathLike[str]) -> Any:
    """Parse JSON ``text`` strictly; every way it can fail is a ``ValueError`` naming ``source``.

    Refused: invalid JSON, ``NaN``/``Infinity`` (not JSON), nesting deeper than Python's recursion limit,
    and integers longer than Python converts (4300 digits). Numbers too large for a float (``1e999``) are
    read as ``inf``: check the values you use.
    """

    def constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply to read") from None
    except ValueError as error:  # JSONDecodeError, too many digits, NaN/Infinity
        raise ValueError(f"{source}: not valid JSON (truncated or corrupt?): {error}") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read the JSON file ``path`` with :func:`parse_json`, refusing files over :data:`JSON_MAX_BYTES`.

    Raises:
        ValueError: too large, not UTF-8, or not valid JSON, naming the file. OSError: unreadable.
    """
    file = Path(path)
    size = file.stat().st_size
    if size > JSON_MAX_BYTES:
        raise ValueError(f"{file}: {size:,} bytes is more JSON than this package reads (at most {JSON_MAX_BYTES:,})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}: not a UTF-8 text file ({error.reason})") from None
    return parse_json(text, file)
