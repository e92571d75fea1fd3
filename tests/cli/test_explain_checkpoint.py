"""``explain --checkpoint DIR "text"``: learned weights of a trained GPT, read through capture()."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from selfattention.cli import build_parser, main
from selfattention.cli.explain_checkpoint import checkpoint_weights, explain_checkpoint
from selfattention.training.recipe import load_gpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(trained_checkpoint: Path) -> Path:
    return trained_checkpoint


def parse(*argv: str) -> argparse.Namespace:
    """The arguments as the real ``explain`` parser reads them."""
    return build_parser().parse_args(["explain", *argv])


def test_weights_are_the_models_own_causal_softmax(checkpoint: Path) -> None:
    """The captured α equals softmax(q kᵀ / sqrt(D)) recomputed from the layer's own projections."""
    tokens, weights, where = checkpoint_weights(str(checkpoint), "Is this a", layer=1, head=1)
    assert tokens == ["I", "s", "␣", "t", "h", "i", "s", "␣", "a"]
    assert where == "layer 1 of 2, head 1 of 2"
    model, tokenizer = load_gpt(checkpoint)
    ids = torch.tensor([tokenizer.encode("Is this a")])
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(9))
    x = model.blocks[0](x)
    attn = model.blocks[1].attn
    h = model.blocks[1].norm1(x)
    q = attn.W_query(h).view(1, 9, 2, 8)[:, :, 1].squeeze(0)  # head 1: (T, D)
    k = attn.W_key(h).view(1, 9, 2, 8)[:, :, 1].squeeze(0)
    scores = (q @ k.T) / 8**0.5
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(weights, torch.softmax(scores, dim=-1).detach())


def test_prints_top_keys_and_plots(checkpoint: Path, tmp_path: Path, capsys) -> None:
    plot = tmp_path / "alpha.png"
    assert explain_checkpoint(parse("--checkpoint", str(checkpoint), "dagger", "--plot", str(plot))) == 0
    out = capsys.readouterr().out
    assert "attention weights α of layer 1 of 2, head 0 of 2" in out
    assert "  0 d  -> 0:d 1.00" in out  # the first token can only attend to itself
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_json_holds_every_weight(checkpoint: Path, capsys) -> None:
    assert explain_checkpoint(parse("--checkpoint", str(checkpoint), "dagger", "--format", "json")) == 0
    data = json.loads(capsys.readouterr().out)
    _, weights, _ = checkpoint_weights(str(checkpoint), "dagger", None, 0)
    assert data["tokens"] == list("dagger")
    torch.testing.assert_close(torch.tensor(data["weights"]), weights, atol=1e-6, rtol=0)  # rounded to 6 places


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layer", "2"], r"--layer 2 out of range: the model has layers 0 to 1"),
        (["--head", "-1"], r"--head -1 out of range: the model has heads 0 to 1"),
    ],
)
def test_bad_layer_or_head(checkpoint: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        explain_checkpoint(parse("--checkpoint", str(checkpoint), "dagger", *argv))


def test_bad_text(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"character\(s\) not in the tokenizer's vocabulary .*'Z'"):
        explain_checkpoint(parse("--checkpoint", str(checkpoint), "Zounds"))
    with pytest.raises(ValueError, match="the text has 30 tokens, more than the context of 24"):
        explain_checkpoint(parse("--checkpoint", str(checkpoint), "a" * 30))
    with pytest.raises(ValueError, match=rf'give the text to explain, e.g. explain --checkpoint {checkpoint} "To be'):
        explain_checkpoint(parse("--checkpoint", str(checkpoint)))


def test_the_explain_command_hands_over_to_the_checkpoint(checkpoint: Path, capsys) -> None:
    assert main(["explain", "--checkpoint", str(checkpoint), "dagger", "--layer", "0", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ["d", "a", "g", "g", "e", "r"]
    assert main(["explain", "dagger"]) == 2
    assert "only used with --checkpoint DIR or --model NAME" in capsys.readouterr().err
