"""Every example in the README and the docs is a test.

- Each ```python block runs on its own, in a fresh namespace and an empty working folder. When the next
  block (with only blank lines between) is a ```text block, that is what the snippet must print; ``...``
  stands for any text, as in doctest's ELLIPSIS.
- Each ```console block is a session: each ``$ selfattention ...`` line runs the command line in-process
  (in one empty folder for the whole block), and the lines up to the next ``$`` are its output, compared the
  same way. Console blocks are kept for commands that take seconds.
- Each ```sh / ```bash line that calls ``selfattention`` is parsed by the real parser, so that a renamed or
  misspelt option in the docs fails here; none of them names a path outside the clone (/tmp, /work, ~).

Why not pytest-markdown-docs: it runs the blocks, but does not compare what they print with the output the
page shows next to them, and it would not check the shell examples; this collector is about a hundred lines.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from selfattention.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```(\S*)")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    output: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``; a ```text block right after a python block becomes its ``output``."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").split("\n")
    i, since_last = 0, 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            since_last += bool(lines[i].strip())
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        block = Block(page, i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n")
        if block.language == "text" and found and found[-1].language == "python" and since_last == 0:
            found[-1].output = block.code
        else:
            found.append(block)
        i, since_last = end + 1, 0
    return found


ALL = [block for page in PAGES for block in blocks(page)]


def matches(want: str, got: str) -> bool:
    checker = doctest.OutputChecker()
    return checker.check_output(want, got, doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)


def cases(*languages: str) -> list[pytest.param]:
    return [pytest.param(block, id=block.id) for block in ALL if block.language in languages]


@pytest.mark.parametrize("block", cases("python"))
def test_python_snippet_runs_on_its_own(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.code, block.id, "exec"), {"__name__": "__main__"})
    if block.output is not None:
        assert matches(block.output, printed.getvalue()), f"{block.id} printed:\n{printed.getvalue()}"


@pytest.mark.parametrize("block", cases("console"))
def test_console_session_prints_what_the_page_shows(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    sessions = re.split(r"^\$ ", block.code, flags=re.M)[1:]
    assert sessions, f"{block.id}: a console block starts each command with '$ '"
    for session in sessions:
        command, _, want = session.partition("\n")
        argv = shlex.split(command)
        assert argv[0] == "selfattention", f"{block.id}: only selfattention commands run here: {command}"
        try:
            code = main(argv[1:])
        except SystemExit as stop:  # argparse's own exits: --version, --help
            code = stop.code
        out, err = capsys.readouterr()
        assert code == 0, f"{block.id}: `{command}` failed: {err}"
        assert matches(want, out), f"{block.id}: `{command}` printed:\n{out}"


def shell_commands(block: Block) -> list[str]:
    """The ``selfattention`` command lines of a shell block (in a console block, those after ``$``)."""
    lines = block.code.replace("\\\n", " ").split("\n")
    if block.language == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    commands = [line.split(" #")[0].strip() for line in lines]
    return [command for command in commands if command.split()[:1] == ["selfattention"]]


@pytest.mark.parametrize("block", cases("sh", "bash", "console"))
def test_shell_examples_parse_and_stay_in_the_clone(block: Block) -> None:
    assert not re.search(r"(?<![\w.])(/tmp/|/work/|~/)", block.code), f"{block.id} names a path outside the clone"
    parser = build_parser()
    for command in shell_commands(block):
        argv = shlex.split(command)[1:]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                _, unknown = parser.parse_known_args(argv)
            except SystemExit as stop:
                if stop.code == 0:  # --help, --version
                    continue
                pytest.fail(f"{block.id}: `{command}` does not parse: {err.getvalue()}")
        assert not unknown, f"{block.id}: `{command}` has unknown arguments {unknown}"


def test_the_collector_finds_the_examples() -> None:
    python = [block for block in ALL if block.language == "python"]
    assert len(python) >= 10 and any(block.output for block in python)
    assert any(block.language == "console" for block in ALL)
    assert not [block.id for block in ALL if block.language == ""], "give every fenced block a language"


def test_the_output_checker_can_fail() -> None:
    assert matches("tensor([0.4419, ...])\n", "tensor([0.4419, 0.6515, 0.5683])\n")
    assert not matches("0.4371\n", "0.4419\n")
