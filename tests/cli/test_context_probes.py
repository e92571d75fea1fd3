"""``selfattention context`` with probe words: the table is the library's sense shift, on MiniLM and on a causal
model; bad ``--sense`` and missing ``--sense`` are one-line errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gguf_files import tiny_weights, write_tiny_gguf
from selfattention.cli import main
from selfattention.cli.context_probes import BASELINE, DEFAULT_AWAY, DEFAULT_TOWARD
from selfattention.contextual import DEFAULT_SENTENCES, word_in_context
from selfattention.pretrained import PretrainedEncoder
from selfattention.probes import probe_vectors, sense_shift, similarity_change, word_in_language_model

PROBES = [*DEFAULT_TOWARD, *DEFAULT_AWAY]


def probe_table(out: str) -> dict[str, list[float | None]]:
    """The sense-shift table the command printed: depth -> the probe words' cosines, then toward, away, baseline."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Probe words: cosine of the shift")) + 3
    table = {}
    for line in lines[start:]:
        if not line.strip():
            break
        table[line[:11].strip()] = [None if v == "-" else float(v) for v in line[11:].split()]  # "-": no words
    return table


@pytest.mark.slow
def test_default_run_probes_bat_toward_caves(minilm: PretrainedEncoder, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["context"]) == 0
    out = capsys.readouterr().out
    assert 'Probe words: cosine of the shift mean(sentences 3, 4) − mean(sentences 1, 2) of "bat"' in out
    table = probe_table(out)
    assert list(table) == ["static", "embeddings"] + [f"layer {n}" for n in range(6)]
    result = word_in_context(minilm, "bat", DEFAULT_SENTENCES)

    def static(words: list[str] | tuple[str, ...]) -> torch.Tensor:
        ids = [minilm.tokenizer.encode(w, add_special_tokens=False).ids for w in words]
        return probe_vectors(minilm.encoder.embeddings.word.weight, ids)

    expected = sense_shift(result.vectors, [False, False, True, True], static(PROBES))  # (8, 9)
    noise = sense_shift(result.vectors, [False, False, True, True], static(BASELINE)).abs().mean(dim=1)
    for depth, row in zip(table.values(), zip(expected, noise, strict=True), strict=True):
        shift, baseline = row
        assert depth[:9] == [round(float(v), 3) for v in shift]
        assert depth[9] == round(float(shift[:5].mean()), 3) and depth[10] == round(float(shift[5:].mean()), 3)
        assert depth[11] == round(float(baseline), 3)
    # the finding the docs state: at every layer the animal sense lies toward cave... and away from hit...
    for n in range(6):
        toward, away, baseline = table[f"layer {n}"][9:]
        assert toward is not None and away is not None and baseline is not None
        assert toward > baseline > 0 > away
    change = similarity_change(result.vectors, static(PROBES))[-1]  # layer 5, (4, 9)
    assert "  3 first  " + "".join(f"{float(v):+9.3f}" for v in change[2]) in out


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights(), qtype="Q8_0")


def test_a_causal_model_gets_the_similarity_and_probe_views(tiny_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from selfattention.loaders.gguf import load_gguf

    sentences = ["a bad cab", "one cab", "ace cab"]
    argv = ["context", "--model", str(tiny_file), "--word", "cab", *sentences, "--toward", "bad,dab", "--sense", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 'Cosine similarity of "cab" between sentences i-j' in out and "Vocabulary tokens" not in out
    table = probe_table(out)
    assert list(table) == ["static", "layer 0", "layer 1"]
    lm = load_gguf(str(tiny_file))
    vectors = word_in_language_model(lm.model, lm.encode, lm.decode, "cab", sentences).vectors
    probes = probe_vectors(lm.model.tok_emb.weight, [lm.encode(" bad"), lm.encode(" dab")])
    expected = sense_shift(vectors, [True, False, False], probes)
    assert [row[:2] for row in table.values()] == [[round(float(v), 3) for v in row] for row in expected]
    assert [row[2] for row in table.values()] == [round(float(row.mean()), 3) for row in expected]  # toward
    assert [row[3] for row in table.values()] == [None, None, None]  # no away words


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_probe_words_need_a_sense_on_your_own_sentences(capsys: pytest.CaptureFixture[str]) -> None:
    own = ["A bat in the cave.", "A bat and a ball."]
    assert "--toward and --away need --sense" in run_error(["context", *own, "--toward", "cave"], capsys)
    assert "--sense [3] out of range: there are sentences 1-2" in run_error(
        ["context", *own, "--toward", "cave", "--sense", "1,3"], capsys
    )
    assert "leave at least one for the other sense" in run_error(
        ["context", *own, "--away", "x", "--sense", "1,2"], capsys
    )
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error: usage, then the message
        main(["context", "--sense", "one"])
    assert exit_info.value.code == 2
    assert "--sense: give sentence numbers separated by commas, got 'one'" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_runs_with_the_default_probes(smollm2, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import selfattention.loaders.gguf as loader

    monkeypatch.setattr(loader, "load_smollm2", lambda: smollm2)  # the session's model stands in for a load
    assert main(["context", "--model", "smollm2"]) == 0
    table = probe_table(capsys.readouterr().out)
    assert list(table) == ["static"] + [f"layer {n}" for n in range(30)]
    vectors = word_in_language_model(smollm2.model, smollm2.encode, smollm2.decode, "bat", DEFAULT_SENTENCES).vectors
    probes = probe_vectors(smollm2.model.tok_emb.weight, [smollm2.encode(" " + w) for w in PROBES])
    expected = sense_shift(vectors, [False, False, True, True], probes)[-1]
    assert table["layer 29"][:9] == [round(float(v), 3) for v in expected]
