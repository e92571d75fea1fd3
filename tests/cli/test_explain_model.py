"""The ``explain --model`` walk-through: a real sentence through one learned head."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from selfattention.cli import UsageError, build_parser, main
from selfattention.cli.explain_model import explain_model
from selfattention.models.head_walkthrough import head_walkthrough
from selfattention.pretrained import PretrainedEncoder


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments as the real ``explain`` parser reads them."""
    return build_parser().parse_args(["explain", *argv])


def test_default_walks_through_journey(minilm: PretrainedEncoder, capsys: pytest.CaptureFixture[str]) -> None:
    assert explain_model(parse(["--model", "minilm"])) == 0
    out = capsys.readouterr().out
    assert out.startswith('all-MiniLM-L6-v2, layer 0, head 0 of 12: "[CLS] your journey starts with one step [SEP]"')
    assert 'Query 2 "journey"' in out and "Scores are scaled by 1/sqrt(32) = 0.1768" in out
    walk = head_walkthrough(minilm, "Your journey starts with one step").walk
    row = next(line for line in out.splitlines() if line.startswith("   3  starts"))
    assert row.split()[2:] == [f"{float(walk.scores[2, 3]):.4f}", f"{float(walk.scores[2, 3]) * walk.scale:.4f}",
                               f"{float(walk.weights[2, 3]):.4f}"]  # fmt: skip


def test_text_layer_head_json_and_plot(minilm: PretrainedEncoder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    plot = tmp_path / "alpha.png"
    argv = ["--model", "minilm", "The bat flew out of the cave", "--layer", "5", "--head", "11"]
    assert explain_model(parse([*argv, "--query", "bat", "--format", "json", "--plot", str(plot)])) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["layer"], document["head"], document["walkthrough"]) == (5, 11, [{"index": 2, "token": "bat"}])
    expected = head_walkthrough(minilm, "The bat flew out of the cave", layer=6, head=11).walk
    torch.testing.assert_close(torch.tensor(document["weights"]), expected.weights)
    assert len(document["projections"]["W_query"]) == 384 and len(document["biases"]["b_value"]) == 32
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_other_text_without_query_takes_the_first_word_piece(minilm: PretrainedEncoder, capsys) -> None:  # type: ignore[no-untyped-def]
    assert explain_model(parse(["--model", "minilm", "Bats sleep"])) == 0
    assert 'Query 1 "bats"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--model", "minilm", "--projections", "4"], UsageError, "--projections does not apply with --model"),
        (["--model", "minilm", "--layer", "6"], ValueError, "--layer 6 is out of range: the model has layers 0-5"),
        (["--model", "minilm", "--head", "-1"], ValueError, "head -1 is out of range"),
        (["--model", "minilm", "  "], ValueError, "text 1 is empty"),
        (["--model", "minilm", "a cave", "--query", "bat"], ValueError, "query 'bat' is not in the sentence"),
        # typed, the default's word is looked for too (it silently took the first word piece)
        (["--model", "minilm", "a cave", "--query", "journey"], ValueError, "query 'journey' is not in the sentence"),
    ],
)
def test_bad_input_is_named(minilm: PretrainedEncoder, argv, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        explain_model(parse(argv))


def test_the_explain_command_hands_over_to_the_model(minilm: PretrainedEncoder, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["explain", "--model", "minilm", "--format", "json"]) == 0
    assert "journey" in json.loads(capsys.readouterr().out)["tokens"]
    assert main(["explain", "--model", "minilm", "--checkpoint", "somewhere"]) == 2
    assert "choose one of --checkpoint DIR and --model NAME" in capsys.readouterr().err
