"""``selfattention patch`` on a tiny GGUF file, against :func:`patching_effects`, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gguf_files import tiny_weights, write_tiny_gguf
from selfattention.cli import main
from selfattention.interventions import patching_effects

pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")

PROMPTS = ["--clean", "abcab", "--corrupted", "abdab", "--answer", "c", "--wrong", "d"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights())


def test_json_is_the_librarys_patching(tiny_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from selfattention.loaders.gguf import load_gguf

    assert main(["patch", "--model", str(tiny_file), *PROMPTS, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    lm = load_gguf(tiny_file)
    ids = [torch.tensor([lm.encode(text)]) for text in ("abcab", "abdab")]
    c, d = lm.encode("c")[0], lm.encode("d")[0]
    result = patching_effects(lm.model.eval(), ids[0], ids[1], c, d)
    assert document["clean"]["logit_difference"] == pytest.approx(result.clean, rel=1e-6)
    torch.testing.assert_close(torch.tensor(document["heads"]), result.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(document["residual_restored"]), result.restored(result.residual))
    assert document["corrupted"]["tokens"] == ["a", "b", "d", "a", "b"]


def test_text_and_heatmaps(tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["patch", "--model", str(tiny_file), *PROMPTS, "--top", "3", "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "logit('c') - logit('d') at the last position" in out
    assert out.count("\n      0 ") + out.count("\n      1 ") == 2  # one residual row per layer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch_heads.png", "patch_residual.png"]
    assert main(["patch", "--model", str(tiny_file), *PROMPTS, "--no-residual"]) == 0
    assert "residual" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--corrupted", "abdabc"], "--clean has 5 tokens and --corrupted 6"),
        (["--answer", "cd"], "--answer 'cd' must be one token, but it is 2"),
        (["--model", "minilm"], "is not a language model"),
        (["--clean", ""], "--clean is empty: give a prompt of at least one token"),
        (["--wrong", "c"], "--answer 'c' and --wrong 'c' are the same token"),
    ],
)
def test_bad_input_is_one_line(
    tiny_file: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = [] if "--model" in argv else ["--model", str(tiny_file)]
    assert main(["patch", *model, *PROMPTS, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
