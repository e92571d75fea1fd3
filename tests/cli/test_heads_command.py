"""``selfattention heads`` on a tiny GGUF file (against the library), on MiniLM and on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gguf_files import tiny_weights, write_tiny_gguf
from selfattention.cli import main
from selfattention.heads import copy_losses, detect_heads, repeated_tokens
from selfattention.interventions import ablate_heads, model_logits

pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights())


def tiny_model(path: Path) -> torch.nn.Module:
    from selfattention.loaders.gguf import load_gguf

    return load_gguf(path).model.eval()


def test_json_scores_and_ablation_are_the_librarys(tiny_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["heads", "--model", str(tiny_file), "--length", "8", "--batch", "2", "--seed", "3", "--format", "json"]
    assert main([*argv, "--ablate", "1.2,0.0"]) == 0
    document = json.loads(capsys.readouterr().out)
    model = tiny_model(tiny_file)
    scores = detect_heads(model, length=8, batch=2, seed=3)
    for pattern in ("previous_token", "duplicate_token", "induction", "sink"):
        torch.testing.assert_close(
            torch.tensor(document["scores"][pattern]), scores.pattern(pattern), atol=1e-6, rtol=0
        )
    assert document["loss"]["second_copy"] == pytest.approx(scores.second_copy_loss, rel=1e-6)
    ids = repeated_tokens(259, 8, batch=2, seed=3)
    with torch.no_grad(), ablate_heads(model, [(1, 2), (0, 0)]):
        first, second = copy_losses(model_logits(model, ids), ids)  # type: ignore[arg-type]
    assert document["ablation"]["loss"] == pytest.approx({"first_copy": first, "second_copy": second}, rel=1e-6)
    assert document["top"]["induction"][0]["score"] == pytest.approx(float(scores.induction.max()), rel=1e-6)


def test_text_table_and_heatmaps(tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["heads", "--model", str(tiny_file), "--length", "8", "--batch", "1", "--top", "2", "--plot", str(tmp_path)]
    assert main([*argv, "--ablate", "1.3", "--mean"]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 4 heads; 1 sequences of 8 random tokens" in out
    assert "with 1.3 mean-ablated: first copy" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  induction")]
    assert len(rows) == 1 and len(rows[0]) == 1 + 2 * 2  # the name, then 2 heads with a score each
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"heads_{p}.png" for p in ("duplicate_token", "induction", "previous_token", "sink")
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "example"], "heads does not take --model example"),
        (["--ablate", "18-6"], "--ablate item '18-6' is not LAYER.HEAD"),
        (["--mean"], "--mean needs --ablate"),
        (["--ablate", "2.0"], "layer 2 out of range: the model has layers 0-1"),
        (
            ["--length", "40"],
            "--length 40 makes runs of 2 x 40 = 80 tokens, more than the model's context of 32; give --length 16 "
            "or less",
        ),
        (["--length", "10", "--ablate", ""], "--ablate item '' is not LAYER.HEAD"),
    ],
)
def test_bad_input_is_one_line(
    tiny_file: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = [] if "--model" in argv else ["--model", str(tiny_file)]
    assert main(["heads", *model, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--plot", ""], "argument --plot: expected a path, got ''"),
        (
            ["--seed", str(1 << 64)],
            "--seed: must be between -9223372036854775808 and 18446744073709551615, got 18446744073709551616",
        ),
    ],
)
def test_bad_option_values_name_the_option(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["heads", *argv])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_a_plot_folder_that_is_a_file_is_named(tiny_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "afile").write_text("")
    assert main(["heads", "--model", str(tiny_file), "--length", "8", "--plot", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.endswith(f"{tmp_path / 'afile'} is a file, not a folder\n")


def test_minilm_gets_scores_without_loss_and_refuses_ablation(minilm, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["heads", "--model", "minilm", "--length", "6", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("minilm: 6 layers x 12 heads") and "loss" not in out
    assert main(["heads", "--model", "minilm", "--ablate", "0.0"]) == 2
    assert "--ablate needs a causal language model" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_table(smollm2, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import selfattention.loaders.gguf as loader

    monkeypatch.setattr(loader, "load_smollm2", lambda: smollm2)
    assert main(["heads", "--model", "smollm2", "--length", "12", "--batch", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SmolLM2-135M-Instruct: 30 layers x 9 heads")
    assert "loss per token (nats): first copy" in out


@pytest.mark.slow
def test_a_trained_checkpoint_takes_heads_patch_and_the_lens(trained_checkpoint: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    model = ["--model", str(trained_checkpoint)]
    assert main(["heads", *model, "--length", "6", "--batch", "1", "--ablate", "0.0"]) == 0
    assert "zero-ablated" in capsys.readouterr().out
    assert main(["explain", *model, "Is this", "--logit-lens"]) == 0
    assert "logit lens of ckpt" in capsys.readouterr().out
    prompts = ["--clean", "Is this a", "--corrupted", "Is that a", "--answer", "d", "--wrong", "e"]
    assert main(["patch", *model, *prompts, "--no-residual"]) == 0
    assert "logit('d') - logit('e')" in capsys.readouterr().out
