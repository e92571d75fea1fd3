"""MkDocs hook: show the docstrings' ``>>>`` examples as code in the API reference.

The library's docstrings carry runnable ``>>>`` examples (tests/test_docstrings.py runs them). Outside an
``Examples:`` section, Markdown would read ``>>>`` as three nested quotes; this hook adds a small Markdown
extension that wraps each run of ``>>>`` lines and their output (up to a blank line) in a ``pycon`` fence.
Lines inside fences already there are left alone. Registered with a high priority, so that it is in the list
of Markdown extensions before mkdocstrings reads that list.
"""

from __future__ import annotations

from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority


class _DoctestFences(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        in_fence, i = False, 0
        while i < len(lines):
            line = lines[i]
            stripped = line.lstrip()
            if stripped.startswith(("```", "~~~")):
                in_fence = not in_fence
            if in_fence or not stripped.startswith(">>>"):
                out.append(line)
                i += 1
                continue
            indent = line[: len(line) - len(stripped)]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].removeprefix(indent))
                i += 1
            out += ["", indent + "```pycon", *(indent + text for text in block), indent + "```", ""]
        return out


class DoctestFences(Extension):
    """Wrap ``>>>`` examples in ``pycon`` code fences."""

    def extendMarkdown(self, md: Markdown) -> None:
        md.preprocessors.register(_DoctestFences(md), "doctest_fences", 40)  # before fenced code (25)


@event_priority(100)
def on_config(config: Any) -> Any:
    """Add the extension to the site's Markdown extensions (mkdocstrings renders docstrings with them)."""
    config.markdown_extensions.append(DoctestFences())
    return config
