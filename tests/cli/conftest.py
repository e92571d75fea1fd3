"""Fixtures shared by the command tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfattention.cli import main


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT checkpoint folder, trained for 20 steps by the ``train`` command itself (about a second)."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = folder / "corpus.txt"
    corpus.write_text("MACBETH:\nIs this a dagger which I see before me?\n\n" * 50, encoding="utf-8")
    before = torch.get_num_threads()
    argv = ["train", "--corpus", str(corpus), "--out", str(folder / "ckpt"), "--config", "tiny"]
    assert main([*argv, "--width", "16", "--context", "24", "--steps", "20", "--no-progress"]) == 0
    torch.set_num_threads(before)  # the command sets the threads it trains with; the other tests keep theirs
    return folder / "ckpt"
