"""``selfattention explain --logit-lens`` against :func:`logit_lens`, and where it does not apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gguf_files import tiny_weights, write_tiny_gguf
from selfattention.cli import main
from selfattention.lens import logit_lens

pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")


def test_json_is_the_top_of_each_layers_lens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from selfattention.loaders.gguf import load_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights())
    assert main(["explain", "--model", str(path), "hello", "--logit-lens", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    lm = load_gguf(path)
    ids = lm.encode("hello")
    lens = logit_lens(lm.model.eval(), torch.tensor([ids]))[:, 0]  # (L, T, V)
    assert len(document["layers"]) == 2 and document["tokens"] == [lm.decode([i]) for i in ids]
    for layer in range(2):
        for i in range(len(ids)):
            best = int(lens[layer, i].argmax())
            assert document["layers"][layer][i]["tokens"][0] == lm.decode([best])
    assert main(["explain", "--model", str(path), "hello", "--logit-lens"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4 + 2 + 2 + 2  # header, 2 layers, blank + title, 2 layers


@pytest.mark.parametrize("argv", [["--logit-lens"], ["--model", "minilm", "a bat", "--logit-lens"]])
def test_without_a_causal_model_it_is_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", *argv]) == 2
    assert "--logit-lens needs a causal language model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("more", "option"), [(["--layer", "99"], "--layer"), (["--head", "3"], "--head"), (["--plot", "l.png"], "--plot")]
)
def test_options_the_lens_does_not_read_are_refused(
    more: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were accepted and did nothing (an out-of-range --layer, a --plot that wrote no file)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights())
    assert main(["explain", "--model", str(path), "hello", "--logit-lens", *more]) == 2
    said = f"{option} does not apply with --logit-lens, which reads every layer at every position\n"
    assert capsys.readouterr().err.endswith(said)
    assert not Path("l.png").exists()  # nothing written where it was asked for


@pytest.mark.slow
def test_smollm2_says_paris_only_at_the_last_layer(smollm2, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import selfattention.loaders.gguf as loader

    monkeypatch.setattr(loader, "load_smollm2", lambda: smollm2)
    assert main(["explain", "--model", "smollm2", "The capital of France is", "--logit-lens"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.split()[:2] == ["29", "␣Paris"]
