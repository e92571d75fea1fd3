"""``selfattention explain --rollout --flow``: the printed numbers are the library's on the captured weights; the
flow's size limit and models without layers are one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from gguf_files import tiny_weights, write_tiny_gguf
from selfattention.cli import main
from selfattention.inspect import capture
from selfattention.pretrained import PretrainedEncoder
from selfattention.rollout import MAX_FLOW_TOKENS, attention_flow, attention_rollout


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights(), qtype="Q8_0")


def captured(path: Path, text: str) -> list[torch.Tensor]:
    """Every layer's α (H, T, T) of the GGUF model on ``text``, read independently of the command."""
    from selfattention.loaders.gguf import load_gguf

    lm = load_gguf(str(path))
    with torch.no_grad(), capture(lm.model) as cap:
        lm.model(torch.tensor([lm.encode(text)]))
    return [cap[name].weights[0] for name in cap.names]


def test_json_holds_the_rollout_and_flow_of_the_captured_weights(tiny_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["explain", "--model", str(tiny_file), "hello", "--rollout", "--flow", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    layers = captured(tiny_file, "hello")
    assert document["layer"] == len(layers) - 1 == 1
    rollout = torch.tensor(document["rollout"])
    assert_close(rollout, attention_rollout(layers)[-1])
    assert_close(rollout.sum(dim=-1), torch.ones(len(document["tokens"])))
    assert torch.equal(rollout.triu(diagonal=1), torch.zeros_like(rollout))  # causal: nothing from later tokens
    assert_close(torch.tensor(document["flow"]), attention_flow(layers))


def test_text_lists_the_top_inputs_and_the_first_tokens_share(tiny_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["explain", "--model", str(tiny_file), "abc", "--rollout", "--layer", "0"]) == 0
    out = capsys.readouterr().out
    first = attention_rollout(captured(tiny_file, "abc"))[0]  # after layer 0 only
    assert "layers 0-0 of 2" in out and "attention flow" not in out
    top = first[2].topk(3)
    expected = ", ".join(
        f"{j}:{'abc'[j]} {float(w):.2f}" for w, j in zip(top.values, top.indices.tolist(), strict=True)
    )
    assert f"  2 c  <- {expected}" in out
    assert f"mean {float(first[:, 0].mean()):.2f}, last token {float(first[2, 0]):.2f}" in out


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_requests_are_one_line(tiny_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = "ab" * 13  # 26 tokens, one per character
    err = run_error(["explain", "--model", str(tiny_file), long, "--flow"], capsys)
    assert f"--flow is limited to {MAX_FLOW_TOKENS} tokens" in err and "the text has 26" in err
    assert "need a model with layers" in run_error(["explain", "--model", "example", "--rollout"], capsys)
    assert "need --model" in run_error(["explain", "--rollout"], capsys)
    assert "--layer 2 is out of range: the model has layers 0-1" in run_error(
        ["explain", "--model", str(tiny_file), "ab", "--rollout", "--layer", "2"], capsys
    )
    assert "give the text" in run_error(["explain", "--model", str(tiny_file), "--rollout"], capsys)


@pytest.mark.slow
def test_minilm_rollout_rows_sum_to_one(minilm: PretrainedEncoder, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["explain", "--model", "minilm", "--rollout", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["tokens"][0] == "[CLS]" and document["layer"] == 5 and document["flow"] is None
    rollout = torch.tensor(document["rollout"])
    assert_close(rollout.sum(dim=-1), torch.ones(len(document["tokens"])))
