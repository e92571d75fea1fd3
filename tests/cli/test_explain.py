"""``selfattention explain``: the walk-through, its formats, its picture, and its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfattention.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["explain", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_walks_through_journey(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0
    for number in ["0.9544", "1.4950", "1.4754", "0.8434", "0.7070", "1.0865"]:
        assert number in out
    for number in ["0.1385", "0.2379", "0.2333", "0.1240", "0.1082", "0.1581"]:
        assert number in out
    assert "z = [0.4419, 0.6515, 0.5683]" in out
    assert "0.4371" not in out
    assert "Attention weights α" in out and "Context vectors z" in out


def test_json_parses_and_agrees_with_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--format", "json", "--all")
    assert code == 0
    data = json.loads(out)
    assert data["tokens"][1] == "journey"
    assert [round(w, 4) for w in data["weights"][1]] == [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]
    assert [round(z, 4) for z in data["context"][1]] == [0.4419, 0.6515, 0.5683]
    assert len(data["walkthrough"]) == 6 and len(data["context"][0]) == 3


def test_projections_match_the_chapter_3_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--projections", "2", "--seed", "123", "--scaled", "--format", "json")
    assert code == 0
    context = json.loads(out)["context"]
    assert [round(z, 4) for z in context[0]] == [0.2996, 0.8053]
    assert [round(z, 4) for z in context[1]] == [0.3061, 0.8210]


def test_causal_masks_the_future(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--causal", "--query", "0", "--format", "json")
    weights = json.loads(out)["weights"]
    assert code == 0 and weights[0][1:] == [0.0] * 5 and weights[0][0] == pytest.approx(1.0)


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "weights.png"
    code, out, _ = run(capsys, "--plot", str(target))
    assert code == 0 and str(target) in out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed, not left behind


def test_own_embeddings_in_three_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens, rows = ["a", "b", "c"], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    (tmp_path / "e.json").write_text(json.dumps({"tokens": tokens, "embeddings": rows}))
    (tmp_path / "e.csv").write_text(
        "token,x,y\n" + "\n".join(f"{t},{r[0]},{r[1]}" for t, r in zip(tokens, rows, strict=True))
    )
    np.save(tmp_path / "e.npy", np.array(rows))
    outputs = []
    for name, extra in (("e.json", []), ("e.csv", []), ("e.npy", ["--tokens", "a b c"])):
        code, out, err = run(capsys, "--embeddings", str(tmp_path / name), *extra, "--query", "c", "--format", "json")
        assert code == 0, err
        outputs.append(json.loads(out)["context"])
    assert outputs[0] == outputs[1] == outputs[2]


BAD = [
    (["--query", "banana"], "query 'banana' is not in the sentence"),
    (["--query", "9"], "query index 9 is out of range"),
    (["--embeddings", "missing.json"], "No such file"),
    (["--embeddings", "x.txt"], "unknown embeddings format '.txt'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"tokens": ["a", "b"], "embeddings": [[1.0, 2.0], [3.0]]},
            "ragged embeddings: row 0 has 2 values but row 1 has 1",
        ),
        ({"tokens": [], "embeddings": []}, "no embeddings"),
        ({"tokens": ["a"], "embeddings": [[1.0, float("nan")]]}, "NaN is not valid JSON"),
        ({"tokens": ["a", "b"], "embeddings": [[1.0, 2.0]]}, "2 tokens but 1 embedding rows"),
        ({"tokens": ["a"], "embeddings": [[1.0, "x"]]}, "row 0, column 1 is not a number: 'x'"),
    ],
)
def test_bad_embeddings_exit_2(content: dict, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    code, _, err = run(capsys, "--embeddings", str(path))
    assert code == 2 and message in err and "Traceback" not in err


def test_unreadable_and_inf_files_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x01")
    code, _, err = run(capsys, "--embeddings", str(tmp_path / "bin.csv"))
    assert code == 2 and "not a UTF-8 text file" in err
    (tmp_path / "inf.csv").write_text("a,1,inf\nb,2,3\n")
    code, _, err = run(capsys, "--embeddings", str(tmp_path / "inf.csv"))
    assert code == 2 and "row 0, column 1 is inf" in err
    np.save(tmp_path / "e.npy", np.ones((2, 2)))
    code, _, err = run(capsys, "--embeddings", str(tmp_path / "e.npy"))
    assert code == 2 and "pass them with --tokens" in err


def test_python_dash_m_runs_as_a_separate_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "selfattention", "explain", "--query", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    tokens = "['Your', 'journey', 'starts', 'with', 'one', 'step']"
    assert (
        done.stderr.strip() == f"selfattention explain: error: query 'nope' is not in the sentence; tokens are {tokens}"
    )
    ok = subprocess.run([sys.executable, "-m", "selfattention", "explain"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "0.4419, 0.6515, 0.5683" in ok.stdout


def test_projections_with_heads_walk_through_one_head_and_plot_all(tmp_path: Path, capsys) -> None:
    target = tmp_path / "heads.png"
    code, out, err = run(capsys, "--projections", "4", "--heads", "2", "--head", "1", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["context"][0]) == 2 and len(data["projections"]["W_query"][0]) == 2
    # Head 1 is columns 2..3 of the one-head draw of width 4: the same W^Q, W^K, W^V, split.
    code, out, _ = run(capsys, "--projections", "4", "--format", "json")
    whole = json.loads(out)["projections"]["W_query"]
    assert [row[2:] for row in whole] == data["projections"]["W_query"]
    code, out, _ = run(capsys, "--projections", "4", "--heads", "2", "--plot", str(target))
    assert code == 0 and target.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--projections", "3", "--heads", "2"], "--projections (3) must be divisible by --heads (2)"),
        (["--projections", "4", "--heads", "2", "--head", "2"], "--head 2 is out of range: there are 2 heads"),
        (["--heads", "2"], "--heads and --head need --projections D"),
    ],
)
def test_bad_head_options_exit_2(argv: list[str], message: str, capsys) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_embeddings_beyond_float32_or_overflowing_exit_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"tokens": ["a", "b"], "embeddings": [[1e39, 1.0], [0.0, 1.0]]}))
    code, _, err = run(capsys, "--embeddings", str(path))
    assert code == 2 and "row 0, column 0 is 1e+39, beyond the float32 range" in err
    path.write_text(json.dumps({"tokens": ["a", "b"], "embeddings": [[1e30, 1.0], [0.0, 1.0]]}))
    code, out, err = run(capsys, "--embeddings", str(path))
    assert code == 2 and "the scores overflowed" in err and "nan" not in out


def test_rows_of_weights_sum_to_one_for_large_embeddings(tmp_path: Path, capsys) -> None:
    """Embeddings near 1e3 give scores near 1e6, where float32 rounds by 0.06: the rows printed 0.8825 and
    0.7788 under the heading "each row sums to 1". The walk-through runs in float64."""
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"tokens": ["a", "b"], "embeddings": [[1e3, 2], [3, -1e3]]}))
    argv = ["explain", "--embeddings", str(path), "--projections", "8", "--all", "--format", "json"]
    assert main(argv) == 0
    weights = np.array(json.loads(capsys.readouterr().out)["weights"])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
