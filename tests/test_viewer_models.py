"""The viewer on the pretrained encoder (skipped, saying what to install, when its packages are missing)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from selfattention import pretrained
from selfattention.cli import main
from selfattention.pretrained import PretrainedEncoder
from selfattention.viz.sources import pretrained_view

TEXT = "The bat flew out of the cave."


def test_every_head_of_every_layer(minilm: PretrainedEncoder) -> None:
    view = pretrained_view(minilm, TEXT)
    assert view.tokens == ["[CLS]", "the", "bat", "flew", "out", "of", "the", "cave", ".", "[SEP]"]
    assert [len(heads) for heads in view.layers] == [12] * 6
    assert view.layer_names[0] == "layer 1 (layers.0.attention)" and not view.causal
    assert view.scales == pytest.approx([1 / math.sqrt(32)] * 6)
    for heads in view.layers:
        for head in heads:
            query, key, value = (torch.tensor(m, dtype=torch.float64) for m in (head.query, head.key, head.value))
            scores = query @ key.T
            torch.testing.assert_close(torch.tensor(head.scores, dtype=torch.float64), scores, rtol=1e-4, atol=1e-4)
            weights = torch.softmax(scores / math.sqrt(32), dim=-1)  # this head's own q and k give its α
            torch.testing.assert_close(torch.tensor(head.weights, dtype=torch.float64), weights, rtol=1e-4, atol=1e-5)
            context = torch.tensor(head.context, dtype=torch.float64)
            torch.testing.assert_close(context, weights @ value, rtol=1e-4, atol=1e-5)
    first, second = view.layers[2][0].weights, view.layers[2][1].weights
    assert first != second


def test_the_command_writes_the_encoder_view(
    minilm: PretrainedEncoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "minilm.html"
    assert main(["view", TEXT, "--model", "minilm", "--out", str(out)]) == 0
    assert "10 tokens, 6 layers, 72 heads" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == pretrained_view(minilm, TEXT).to_html()


def test_a_missing_weights_package_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing() -> Path:
        raise pretrained.PretrainedNotInstalledError(
            f"the pretrained model is not installed; {pretrained.INSTALL_HINT}"
        )

    monkeypatch.setattr(pretrained, "minilm_path", missing)
    assert main(["view", "--model", "minilm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and "Traceback" not in err
