"""``selfattention train`` and ``generate``: a real (tiny) run, Ctrl-C and resume, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfattention.cli import main
from selfattention.training.checkpoint import config_digest

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = "".join(
    f"{name}:\nTo be, or not to be, that is the question {i}.\n\n"
    for i, name in enumerate(["HAMLET", "OPHELIA", "HORATIO"] * 60)
)
TINY = ["--config", "tiny", "--width", "16", "--context", "16", "--eval-interval", "10", "--no-progress"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def current(folder: Path) -> Path:
    """The step folder a checkpoint folder's latest.json points to."""
    return folder / json.loads((folder / "latest.json").read_text())["folder"]


def history(folder: Path) -> dict:
    return json.loads((current(folder) / "config.json").read_text())["trainer"]["history"]


def test_train_lowers_the_loss_and_generates(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "60"]) == 0
    printed = capsys.readouterr().out
    assert "step 60: train loss" in printed and "val loss" in printed
    losses = history(out)
    assert len(losses["train"]) == 60 and [s for s, _ in losses["val"]] == [10, 20, 30, 40, 50, 60]
    assert losses["val"][-1][1] < 0.8 * losses["val"][0][1]  # from ~log(V) towards the repeated text
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(["generate", "--checkpoint", str(out), "To be", "--max-new-tokens", "30", "--temperature", "0"])
    text = capsys.readouterr().out
    assert code == 0
    assert text.startswith("To be") and len(text.rstrip("\n")) == 35


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(corpus: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) mid-run saves a checkpoint; --resume then reproduces the uninterrupted losses exactly."""
    args = ["--corpus", str(corpus), *TINY, "--steps", "200", "--threads", "1"]
    assert main(["train", "--out", str(tmp_path / "whole"), *args]) == 0
    folder = tmp_path / "cut"
    command = [sys.executable, "-m", "selfattention", "train", "--out", str(folder), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (folder / "latest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    printed, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    cut = history(folder)
    step = len(cut["train"])
    assert f"continue from the checkpoint of step {step} in {folder} with --resume" in printed
    assert 10 <= step < 200, "the run finished before the interrupt: make it longer"
    whole = history(tmp_path / "whole")
    assert cut["train"] == whole["train"][:step]
    assert main(["train", "--out", str(folder), "--resume", "--corpus", str(corpus), "--no-progress"]) == 0
    resumed = history(folder)
    assert resumed["train"] == whole["train"]  # exactly: same weights, moments, data order and RNG
    assert resumed["val"] == whole["val"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary (it contains a NUL byte at offset 8)"),
        (b"short", "the training split has 4 tokens, fewer than context + 1 = 17"),
    ],
)
def test_bad_corpus_is_one_line_exit_2(tmp_path: Path, capsys, content: bytes, message: str) -> None:
    path = tmp_path / "corpus.bin"
    path.write_bytes(content)
    assert main(["train", "--corpus", str(path), "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfattention train: error: ") and message in err
    assert err.count("\n") == 1


def test_generate_errors(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "Zebra ✓"]) == 2
    err = capsys.readouterr().err
    assert "not in the tokenizer's vocabulary of" in err and "'Z'" in err and "'✓'" in err
    assert main(["generate", "--checkpoint", str(out), "To be", "--max-new-tokens", "40", "--no-slide"]) == 2
    err = capsys.readouterr().err  # in the options' names, not generate()'s (slide=True, cache='window')
    assert "= 45 exceeds the context of 16; shorten them, or drop --no-slide, or stream past the context with " in err
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "To"]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = json.loads((current(out) / "config.json").read_text())
    config["model"]["emb_dim"] = 32
    config["sha256"] = config_digest(config)  # a consistent config whose sizes do not fit the weights
    (current(out) / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--checkpoint", str(out), "To"]) == 2
    assert "model.safetensors: tensor tok_emb.weight has shape (37, 16), the model expects (37, 32)" in (
        capsys.readouterr().err
    )
    os.truncate(current(out) / "model.safetensors", 100)
    assert main(["generate", "--checkpoint", str(out), "To"]) == 2
    assert "model.safetensors has 100 bytes but config.json recorded" in capsys.readouterr().err


@pytest.mark.filterwarnings("error::UserWarning")  # the checks convert no tensor that requires grad
def test_a_file_in_the_way_and_a_diverging_run_are_said_in_one_line(corpus: Path, tmp_path: Path, capsys) -> None:
    """Before any training for --out; for a learning rate that blows the weights up, the step and the rate
    (and no warning lines from the checks on the way)."""
    (tmp_path / "afile").write_text("")
    assert main(["train", "--corpus", str(corpus), "--out", str(tmp_path / "afile"), *TINY, "--steps", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith(
        "--out " + str(tmp_path / "afile") + " is a file; give a folder for the checkpoints\n"
    )
    run = ["train", "--corpus", str(corpus), "--out", str(tmp_path / "run"), *TINY, "--steps", "9", "--lr", "1e10"]
    assert main(run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: training diverged at step " in err and "(learning rate " in err, err


def test_resume_refuses_new_settings_and_another_corpus(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "2"]) == 0
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "2"]) == 2
    assert "already holds a checkpoint; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--resume", "--steps", "9"]) == 2
    assert "--resume continues the saved configuration; do not also set --steps\n" in capsys.readouterr().err
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "choose one of --resume (continue the checkpoint) and --overwrite" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text(CORPUS.upper(), encoding="utf-8")
    assert main(["train", "--corpus", str(other), "--out", str(out), "--resume"]) == 2
    assert "trained on a different corpus" in capsys.readouterr().err
    typo = tmp_path / "rnu"
    assert main(["train", "--corpus", str(corpus), "--out", str(typo), "--resume"]) == 2
    assert f"--resume: {typo} does not exist; give the folder of the run to continue\n" in capsys.readouterr().err
    assert not typo.exists()  # a mistyped folder is not made
    config = json.loads((current(out) / "config.json").read_text())
    config["trainer"]["world_size"] = 2  # as a run under torchrun --nproc_per_node=2 saves it
    config["sha256"] = config_digest(config)
    (current(out) / "config.json").write_text(json.dumps(config))
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--resume"]) == 2
    message = f"cannot resume {out} with 1 process(es): it was trained with 2 (the batch size is per process)"
    assert message in capsys.readouterr().err


def test_the_largest_seed_trains_through_validation(corpus: Path, tmp_path: Path) -> None:
    """The validation batches are drawn with seed + 1, which overflowed at the largest seed --seed takes."""
    out = tmp_path / "run"
    argv = ["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "10", "--seed", str(2**64 - 1)]
    assert main(argv) == 0
    assert [step for step, _ in history(out)["val"]] == [10]


def test_a_learning_rate_below_the_configs_floor_moves_the_floor(corpus: Path, tmp_path: Path) -> None:
    """The tiny config decays from 3e-3 to 3e-4: --lr 1e-4 was refused ("min_learning_rate (0.0003)"), an
    option the command line does not have. The floor keeps the config's ratio, a tenth."""
    out = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "2", "--lr", "1e-4"]) == 0
    trainer = json.loads((current(out) / "config.json").read_text())["trainer"]["config"]
    assert trainer["learning_rate"] == 1e-4 and trainer["min_learning_rate"] == pytest.approx(1e-5, rel=1e-12)


def test_sizes_beyond_the_machine_are_refused_in_one_line(corpus: Path, tmp_path: Path, capsys) -> None:
    """Before any allocation: a --width of 10**5 gave a traceback from the allocator (exit 1), and a
    --vocab-size of 10**9 aborted the process inside the tokenizer library (exit 134)."""
    argv = ["train", "--corpus", str(corpus), "--out", str(tmp_path / "run"), *TINY, "--steps", "2"]
    assert main([*argv, "--width", "100000", "--heads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: the model has 240,0" in err and "lower --width, --layers" in err
    with pytest.raises(SystemExit) as exit_code:
        main([*argv, "--tokenizer", "bpe", "--vocab-size", str(10**9)])
    assert exit_code.value.code == 2
    assert "--vocab-size: must be between 257 and 1048576, got 1000000000" in capsys.readouterr().err


def test_bpe_tokenizer_trains_saves_and_generates(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bpe"
    argv = ["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "3"]
    assert main([*argv, "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    tokenizer = json.loads((current(out) / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"
    assert json.loads((current(out) / "config.json").read_text())["model"]["vocab_size"] == 300
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "Zebra ✓", "--max-new-tokens", "5"]) == 0  # bytes: no unknowns
    assert capsys.readouterr().out.startswith("Zebra ✓")


def test_threads_are_left_to_pytorch_unless_given(corpus: Path, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(2)  # the one_thread fixture restores the count afterwards
    assert main(["train", "--corpus", str(corpus), "--out", str(tmp_path / "a"), *TINY, "--steps", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert (
        main(["train", "--corpus", str(corpus), "--out", str(tmp_path / "b"), *TINY, "--steps", "2", "--threads", "1"])
        == 0
    )
    assert torch.get_num_threads() == 1


def test_the_interrupt_message_offers_resume_only_when_it_can(
    corpus: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import selfattention.training.recipe as recipe

    out = tmp_path / "run"

    def interrupted(options) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "train_gpt", interrupted)
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY]) == 130
    assert f"interrupted; {out} holds no checkpoint that can resume" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--steps", "10"]) == 0
    monkeypatch.setattr(recipe, "train_gpt", interrupted)
    capsys.readouterr()
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--resume", "--no-progress"]) == 130
    assert f"continue from the checkpoint of step 10 in {out} with --resume" in capsys.readouterr().out
    (current(out) / "trainer.safetensors").write_bytes(b"x")  # damaged: it cannot resume any more
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--resume", "--no-progress"]) == 130
    assert "holds no checkpoint that can resume" in capsys.readouterr().out
