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


def train(command: list[str], out: Path, corpus: Path, batch: int) -> None:
    # gloo binds to the loopback interface, so no rank talks over any other address
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_name()}
    argv = [
        *command,
        "-m",
        "selfattention",
        "train",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        *ARGS,
        "--batch-size",
        str(batch),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]
    train(torchrun, tmp_path / "two", corpus, batch=2)
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


def _dropout_masks(resumed: bool) -> tuple[int, torch.Tensor]:
    import torch.distributed as dist

    from selfattention.training import ddp

    info = ddp.DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    torch.manual_seed(7)  # the same state on every rank, as after building the weights (or restoring a checkpoint)
    ddp.seed_dropout(info, 7, resumed=resumed)
    return info.rank, torch.nn.functional.dropout(torch.ones(64), 0.5)


@pytest.mark.parametrize("resumed", [False, True])
def test_each_rank_drops_its_own_units(resumed: bool) -> None:
    from selfattention.launch import run_local

    (_, first), (_, second) = run_local(_dropout_masks, 2, resumed, timeout=60)
    assert not torch.equal(first, second)
    again = run_local(_dropout_masks, 2, resumed, timeout=60)
    assert torch.equal(again[0][1], first) and torch.equal(again[1][1], second)  # and reproducibly so
