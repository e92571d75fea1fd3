"""``--device``: parsed the same way by every command, refused in one line where CUDA is missing."""

from __future__ import annotations

import pytest
import torch

from selfattention.cli import main
from selfattention.cli.device import resolve_device
from selfattention.cli.errors import UsageError
from selfattention.training import ddp

COMMANDS = {
    "train": ["train", "--out", "never-written", "--config", "tiny"],
    "generate": ["generate", "--checkpoint", "never-read", "To be"],
    "context": ["context"],
    "context --model smollm2": ["context", "--model", "smollm2"],
    "explain --model": ["explain", "--model", "minilm"],
    "explain --model smollm2": ["explain", "--model", "smollm2", "The capital"],
    "explain --logit-lens": ["explain", "--model", "smollm2", "The capital", "--logit-lens"],
    "explain --rollout": ["explain", "--model", "smollm2", "The capital", "--rollout"],
    "view --model": ["view", "--model", "smollm2"],
    "heads": ["heads", "--model", "smollm2"],
    "patch": ["patch", "--model", "smollm2"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_cuda_where_there_is_none_is_one_line_and_exit_2(name, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*COMMANDS[name], "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "--device cpu" in err, err


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu"])
def test_unknown_devices_are_named(name):
    with pytest.raises(UsageError, match=f"--device must be cpu, cuda or cuda:N, got '{name}'"):
        resolve_device(name)


def test_a_gpu_number_beyond_the_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match=r"there are 2 CUDA device\(s\), numbered 0-1"):
        resolve_device("cuda:2")


def test_cpu_is_the_default_and_explain_takes_device_only_with_a_model(capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    assert main(["explain", "--device", "cuda"]) == 2
    assert "--device cuda is only used with a model: --model NAME or --checkpoint DIR" in capsys.readouterr().err


def test_the_viewers_example_refuses_a_device(capsys):
    assert main(["view", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    only = "--device cuda is only used with a model (minilm, smollm2, FILE.gguf, a checkpoint)"
    assert err == f"selfattention view: error: {only}\n"


def test_one_process_trains_where_it_is_told(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.setup().device == torch.device("cpu")
    assert ddp.setup(device="cuda:1").device == torch.device("cuda", 1)  # not touched until used
