"""Data-parallel training: ``torchrun`` with 2 CPU ranks (gloo on 127.0.0.1) equals one process.

Two ranks with batch b each see the two halves of the global batch that one process with batch 2b sees
(the same seeded offsets, sliced by rank), and DDP averages their gradients: the mean of two half-batch
means is the full-batch mean. So the parameters agree after every step, up to float32 rounding of the
different summation order (the all-reduce adds two partial gradients; one process adds all rows at once).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfattention.launch import loopback_name
from selfattention.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = "".join(
    f"{who}:\nWhat light through yonder window breaks {i}?\n\n"
    for i, who in enumerate(["ROMEO", "JULIET", "NURSE"] * 40)
)
ARGS = ["--config", "tiny", "--width", "16", "--context", "16", "--steps", "6", "--eval-interval", "3", "--no-progress"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train(
    command: list[str], out: Path, corpus: Path, batch: int, *more: str, script: list[str] | None = None, code: int = 0
) -> None:
    """``selfattention train`` under ``command`` (python, or torchrun), or ``script`` standing in for it."""
    # gloo binds to the loopback interface, so no rank talks over any other address
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_name()}
    run = script or ["-m", "selfattention"]
    argv = [*command, *run, "train", "--corpus", str(corpus), "--out", str(out), *ARGS, "--batch-size", str(batch)]
    done = subprocess.run([*argv, *more], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == code, done.stderr[-3000:]


def torchrun(ranks: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    train(torchrun(2), tmp_path / "two", corpus, batch=2)
    train([sys.executable], tmp_path / "one", corpus, batch=4)
    two, one = load_checkpoint(tmp_path / "two"), load_checkpoint(tmp_path / "one")
    assert two.config["trainer"]["world_size"] == 2 and one.config["trainer"]["world_size"] == 1
    assert two.step == one.step == 6
    assert two.weights.keys() == one.weights.keys()
    for name in one.weights:
        torch.testing.assert_close(two.weights[name], one.weights[name], msg=name)
    history = [c.config["trainer"]["history"] for c in (two, one)]
    losses = [[loss for _, loss in h["train"]] for h in history]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]))
    torch.testing.assert_close(torch.tensor(history[0]["val"]), torch.tensor(history[1]["val"]))
    assert not any(p.name.startswith(".") for p in (tmp_path / "two").iterdir())  # rank 1 wrote nothing


def test_environment_without_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from selfattention.training import ddp

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = ddp.setup()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' must be integers"):
        ddp.setup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"RANK \(5\) must be in \[0, WORLD_SIZE=2\)"):
        ddp.setup()


def test_each_rank_and_step_has_its_own_dropout_seed() -> None:
    from selfattention.training.ddp import step_seed

    seeds = {step_seed(seed, rank, step) for seed in (0, 7) for rank in range(4) for step in range(50)}
    assert len(seeds) == 2 * 4 * 50  # every rank its own units, every step new ones
    assert step_seed(7, 1, 3) == step_seed(7, 1, 3) and 0 <= step_seed(2**64 - 1, 1, 3) < 2**64


STOP_AFTER_3 = """
import sys
from selfattention.training import loop

def stop(trainer):
    if trainer.step == 3:
        raise KeyboardInterrupt  # on every rank after the same step, as a Ctrl-C that torchrun passes on

run = loop.Trainer.run
loop.Trainer.run = lambda self, until=None: (setattr(self, "on_step", stop), run(self, until))[1]
from selfattention.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_ranks_with_dropout_resume_exactly(tmp_path: Path) -> None:
    """Each rank's dropout stream is a function of the seed, its rank and the step, so a run stopped after step 3
    and resumed draws the masks the uninterrupted run drew (from rank 0's saved state the ranks drew new ones)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    script = tmp_path / "stop_after_3.py"
    script.write_text(STOP_AFTER_3)
    train(torchrun(2), tmp_path / "whole", corpus, 2, "--dropout", "0.2")
    train(torchrun(2), tmp_path / "cut", corpus, 2, "--dropout", "0.2", script=[str(script)], code=1)
    assert load_checkpoint(tmp_path / "cut").step == 3
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_name()}
    resume = [*torchrun(2), "-m", "selfattention", "train", "--corpus", str(corpus), "--out", str(tmp_path / "cut")]
    done = subprocess.run([*resume, "--resume", "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    whole, cut = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    assert cut.step == whole.step == 6
    assert cut.config["trainer"]["history"] == whole.config["trainer"]["history"]
    for name in whole.weights:
        assert torch.equal(cut.weights[name], whole.weights[name]), name
