"""Atomic writes: the target is complete or untouched, and gets the mode a plain open() would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfattention import files
from selfattention.files import atomic_path, parse_json, read_json, write_durably, write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_error_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_links_are_written_through_modes_kept_and_devices_refused(tmp_path: Path) -> None:
    """`view --out /dev/full` replaced the device with an HTML file; a link became a plain file; a file kept
    read-only came back 0644."""
    real = tmp_path / "real.html"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.html"
    link.symlink_to(real)
    write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert real.stat().st_mode & 0o777 == 0o640
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=rf"cannot write {fifo}: it exists and is not a regular file"):
        write_text(fifo, "x")
    assert fifo.exists() and not fifo.is_file()


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="does not exist"):
        write_text(tmp_path / "nope" / "out.txt", "x")


def test_errors_name_the_path_asked_for_not_the_temporary_one(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(IsADirectoryError, match=rf"^cannot write {tmp_path}: it is a folder$"):
        write_text(tmp_path, "x")

    def refused(**_: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.txt.abc.tmp"))

    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError, match=rf"^cannot write {tmp_path / 'out.txt'}: Permission denied$"):
        write_text(tmp_path / "out.txt", "x")


def test_make_folder_names_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError, match=rf"^{tmp_path / 'afile'} is a file, not a folder$"):
        files.make_folder(tmp_path / "afile")
    assert files.make_folder(tmp_path / "a" / "b").is_dir()


def test_write_is_durable_file_then_rename_then_folder(tmp_path: Path, monkeypatch) -> None:
    """fsync of the data before the rename (else a power cut can leave an empty file under the new name),
    and of the folder after it (else the rename itself can be lost)."""
    import stat

    calls: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        calls.append(("fsync dir" if stat.S_ISDIR(info.st_mode) else "fsync file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out.txt"
    write_text(target, "new")
    file, folder = target.stat().st_ino, tmp_path.stat().st_ino
    assert calls == [("fsync file", file), ("replace", file), ("fsync dir", folder)]
    assert target.read_text() == "new"


def test_write_durably_fsyncs_and_refuses_to_overwrite(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)) and None)
    write_durably(tmp_path / "data.bin", b"\x00\x01")
    assert synced == [(tmp_path / "data.bin").stat().st_ino]
    assert (tmp_path / "data.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(FileExistsError):
        write_durably(tmp_path / "data.bin", b"again")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("9" * 5000, "not valid JSON"),
        ("[NaN]", "NaN is not valid JSON"),
        ("[-Infinity]", "-Infinity is not valid JSON"),
        ('{"a": ', r"not valid JSON \(truncated or corrupt\?\)"),
    ],
)
def test_json_errors_are_one_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^in.json: .*{message}"):
        parse_json(text, "in.json")


def test_json_files_too_large_or_not_utf8_are_refused(tmp_path: Path, monkeypatch) -> None:
    import selfattention.files as files

    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 100 + "0]")
    monkeypatch.setattr(files, "JSON_MAX_BYTES", 100)
    with pytest.raises(ValueError, match=r"big.json: 203 bytes is more JSON than this package reads \(at most 100\)"):
        read_json(path)
    path.write_bytes(b'["\xff"]')
    with pytest.raises(ValueError, match=r"big.json: not a UTF-8 text file"):
        read_json(path)


def test_read_json_reads_up_to_the_limit_and_names_the_file(tmp_path: Path, monkeypatch) -> None:
    import selfattention.files as files

    path = tmp_path / "ok.json"
    path.write_text('{"a": [1, 2.5, "é"]}', encoding="utf-8")
    monkeypatch.setattr(files, "JSON_MAX_BYTES", path.stat().st_size)  # exactly at the limit: still read
    assert read_json(path) == {"a": [1, 2.5, "é"]}
    path.write_text('{"a": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"ok.json: not valid JSON"):
        read_json(path)


def test_text_and_json_are_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """A file written under an ASCII locale (LC_CTYPE=C, as in a bare container) is still UTF-8, and is read
    back as UTF-8: the encoding is never the locale's."""
    import locale

    text = '{"name": "é—ü"}'
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getencoding().lower() not in ("utf-8", "utf8")  # the locale default cannot encode "é"
        write_text(tmp_path / "out.json", text)
        (tmp_path / "in.json").write_bytes(text.encode("utf-8"))
        read = read_json(tmp_path / "in.json")
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
    assert (tmp_path / "out.json").read_bytes() == text.encode("utf-8")
    assert read == {"name": "é—ü"}
