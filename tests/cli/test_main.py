"""The command line as a whole: listing the commands, --version, usage on typos, option names in errors,
figure formats by suffix, JSON at float32 precision and generated outputs ignored by git."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfattention import examples
from selfattention.cli import COMMANDS, main
from selfattention.cli.options import float32_number, json_text
from selfattention.walkthrough import walk

ROOT = Path(__file__).resolve().parents[2]
COMMAND_NAMES = ["explain", "train", "generate", "context", "view", "heads", "patch"]


def test_no_command_lists_the_commands_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert len(COMMANDS) == len(COMMAND_NAMES)
    for name in COMMAND_NAMES:
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), f"{name} is not listed with its help:\n{out}"


def test_version_is_the_installed_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"selfattention {version('selfattention')}"


def test_a_typo_shows_the_subcommands_usage_and_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["explain", "--qurey", "starts"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("usage: selfattention explain ")
    assert "unrecognized arguments: --qurey" in err and "did you mean --query?" in err


def test_an_unknown_top_level_option_shows_the_top_level_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--qurey"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: selfattention [-h]") and "--qurey" in err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["train", "--steps", "0"], "--steps"),
        (["train", "--batch-size", "-2"], "--batch-size"),
        (["train", "--eval-interval", "0"], "--eval-interval"),
        (["train", "--warmup", "-1"], "--warmup"),
        (["train", "--dropout", "1"], "--dropout"),
        (["train", "--lr", "0"], "--lr"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--heads", "0"], "--heads"),
        (["train", "--threads", "0"], "--threads"),
        (["train", "--vocab-size", "100"], "--vocab-size"),
        (["generate", "p", "--checkpoint", "x", "--top-k", "0"], "--top-k"),
        (["generate", "p", "--checkpoint", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", "p", "--checkpoint", "x", "--temperature", "-1"], "--temperature"),
        (["explain", "--plot", "weights.bmp"], "--plot"),
        (["explain", "--projections", "0"], "--projections"),
        (["explain", "--projections", "4", "--heads", "0"], "--heads"),
        # empty names fell back to the worked example, or read the current folder as a checkpoint
        (["explain", "--embeddings", ""], "--embeddings"),
        (["explain", "--model", ""], "--model"),
        (["heads", "--model", " "], "--model"),
        (["generate", "p", "--checkpoint", ""], "--checkpoint"),
    ],
)
def test_a_bad_value_is_reported_under_the_option_typed(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: selfattention {argv[0]} ")
    assert f"error: argument {option}" in err
    internal = r"max_steps|batch_size|eval_interval|warmup_steps|learning_rate|top_k|max_new_tokens|projection width"
    assert not re.search(internal, err)
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heads", "3"], "--width (128) must be divisible by --heads (3)"),
        (["--kv-heads", "3"], "--heads (4) must be divisible by --kv-heads (3)"),  # checked by the attention layer
    ],
)
def test_options_checked_together_are_named_as_typed(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"selfattention train: error: {message}"
    assert not (tmp_path / "run").exists()


MAGIC = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "svg": (b"<?xml", b"<svg"),
    "pdf": (b"%PDF-",),
    "jpg": (b"\xff\xd8\xff",),
    "JPEG": (b"\xff\xd8\xff",),
}


@pytest.mark.parametrize("suffix", list(MAGIC))
@pytest.mark.parametrize("heads", [1, 2])
def test_plot_writes_the_format_its_suffix_names(
    suffix: str, heads: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / f"weights.{suffix}"
    extra = ["--projections", "4", "--heads", "2"] if heads == 2 else []
    assert main(["explain", *extra, "--plot", str(target)]) == 0
    capsys.readouterr()
    assert target.read_bytes().startswith(MAGIC[suffix])


@pytest.mark.parametrize("name", ["weights.bmp", "weights", "weights.png.txt"])
def test_plot_refuses_other_suffixes_before_any_work(name: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["explain", "--plot", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "use one of .png, .svg, .pdf, .jpg" in err
    assert not list(tmp_path.iterdir())


def test_library_plots_refuse_an_unknown_suffix(tmp_path: Path) -> None:
    from selfattention.viz.heatmap import plot_weights

    with pytest.raises(ValueError, match=r"suffix '\.gif'"):
        plot_weights(np.eye(2), ["a", "b"], ["a", "b"], tmp_path / "w.gif")  # type: ignore[arg-type]


NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def test_json_numbers_are_the_float32_values_written_short(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--all", "--format", "json"]) == 0
    text = capsys.readouterr().out
    assert "0.4300000071525574" not in text and "0.43," in text
    for number in NUMBER.findall(text):
        digits = number.split("e")[0].lstrip("-").replace(".", "").lstrip("0")
        assert len(digits) <= 9, number  # float32: at most 9 significant digits round-trip
    data = json.loads(text)
    result = walk(list(examples.TOKENS), examples.embeddings())
    for name in ("scores", "weights", "context"):
        ours = np.array(data[name], dtype=np.float32)
        assert np.array_equal(ours, getattr(result, name).numpy()), name  # exactly the computed float32 values


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_number_round_trips_and_is_shortest(value: float) -> None:
    short = float32_number(value)
    assert np.float32(short) == np.float32(value)
    assert len(repr(short)) <= len(repr(value))


def test_json_text_rounds_tensors_and_nested_floats() -> None:
    import torch

    document = {"w": torch.tensor([0.1385, 1.0 / 3.0]), "nested": [{"x": 0.4300000071525574}], "n": 3, "s": "α"}
    assert json.loads(json_text(document)) == {"w": [0.1385, 0.33333334], "nested": [{"x": 0.43}], "n": 3, "s": "α"}


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("path", ["gpt-out/config.json", "attention-view.html", "site/index.html"])
def test_default_outputs_are_ignored_by_git(path: str) -> None:
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    assert result.returncode == 0, f"{path} is not ignored"


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory: "
                "you tried to allocate 256000000 bytes. Error code 12 (Cannot allocate memory)"
            ),
            "out of memory: could not allocate 256000000 bytes",
        ),
        (MemoryError(), "out of memory: MemoryError"),
    ],
)
def test_a_failed_allocation_is_one_line_and_any_other_runtime_error_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys, raised: BaseException, said: str
) -> None:
    """What the allocator says when a model or batch does not fit; other RuntimeErrors are bugs to report."""
    from selfattention.cli import train

    def fail(args):  # type: ignore[no-untyped-def]
        raise raised

    monkeypatch.setattr(train, "run", fail)
    assert main(["train"]) == 2
    assert capsys.readouterr().err == f"selfattention train: error: {said}\n"
    monkeypatch.setattr(train, "run", lambda args: (_ for _ in ()).throw(RuntimeError("an index went wrong")))
    with pytest.raises(RuntimeError, match="an index went wrong"):
        main(["train"])
