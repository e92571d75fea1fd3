"""``selfattention generate --cache``: rolling caches from the command line, and the flags' errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfattention.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = "".join(f"HAMLET:\nTo be, or not to be, that is the question {i}.\n\n" for i in range(60))
TINY = ["--config", "tiny", "--width", "16", "--context", "16", "--no-progress", "--steps", "2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runs")
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    runs = {"rope": folder / "rope", "learned": folder / "learned"}
    assert main(["train", "--corpus", str(corpus), "--out", str(runs["rope"]), *TINY, "--rope"]) == 0
    assert main(["train", "--corpus", str(corpus), "--out", str(runs["learned"]), *TINY]) == 0
    return runs


@pytest.mark.parametrize("flags", [["--cache", "sinks", "--window", "8", "--sinks", "2"], ["--cache", "window"]])
def test_a_rolling_cache_generates_past_the_context(checkpoints: dict[str, Path], flags: list[str], capsys) -> None:
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(checkpoints["rope"]), "To be", "--max-new-tokens", "40", *flags]
    assert main([*argv, "--temperature", "0", "--no-slide"]) == 0  # 45 tokens > the context of 16
    assert len(capsys.readouterr().out.rstrip("\n")) == 45


@pytest.mark.parametrize(
    ("run", "flags", "message"),
    [
        ("learned", ["--cache", "window"], "needs a rotary model: this one has learned absolute positions"),
        ("rope", ["--window", "4"], "--window applies to --cache window or sinks, not full"),
        ("rope", ["--cache", "window", "--sinks", "2"], "--sinks applies to --cache sinks, not window"),
        ("rope", ["--cache", "sinks", "--window", "16"], "4 sinks + a window of 16 tokens must fit context_length=16"),
        ("rope", ["--cache", "sinks", "--sinks", "0"], "the sinks policy keeps at least 1 sink, got sinks=0"),
        (
            "rope",
            ["--cache", "sinks", "--no-cache"],
            "--cache sinks keeps a rolling cache; it cannot be used with --no-cache",
        ),
        ("rope", ["--cache", "window", "--no-cache"], "--cache window keeps a rolling cache; it cannot be used with"),
    ],
)
def test_cache_flag_errors(checkpoints: dict[str, Path], run: str, flags: list[str], message: str, capsys) -> None:
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoints[run]), "To", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfattention generate: error: ") and message in err and err.count("\n") == 1


def test_view_shows_the_last_streamed_step(checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "stream.html"
    argv = ["view", "To be", "--model", str(checkpoints["rope"]), "--cache", "sinks", "--window", "6"]
    assert main([*argv, "--sinks", "2", "--max-new-tokens", "20", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert "⋯ 17 evicted ⋯" in page and "⚓" in page  # 25 tokens streamed, 2 + 6 kept
    assert main(["view", "To", "--cache", "window", "--out", str(out)]) == 2
    assert (
        "--cache views a language model (smollm2, FILE.gguf or a checkpoint), not 'example'" in capsys.readouterr().err
    )
