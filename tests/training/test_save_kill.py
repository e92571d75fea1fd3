"""A process killed at any instant of a save leaves a checkpoint that loads and resumes.

Fault injection: a forked child trains (or saves) with the file-system calls a save makes (``os.fsync``,
``os.rename``, ``os.replace``, ``os.unlink``, ``os.rmdir``) wrapped so that the N-th one ends the process with
``os._exit`` before it happens: no ``finally``, no cleanup, as a kill -9 or a power cut would. N runs over
every call of the save (each file written, each fsync, each rename, each removal of the old step), and
after each death the parent loads the folder, resumes, and compares with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from selfattention.models.gpt import GPT, GPTConfig
from selfattention.training import checkpoint as ckpt
from selfattention.training import recipe
from selfattention.training.checkpoint import load_checkpoint, load_weights, save_checkpoint
from selfattention.training.recipe import RunOptions, load_gpt, train_gpt
from selfattention.training.tokenizer import CharTokenizer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks a child process"),
]

CALLS = ("fsync", "rename", "replace", "unlink", "rmdir")
CORPUS = "To be, or not to be, that is the question.\n" * 40
MODEL = {"emb_dim": 16, "context_length": 16, "num_layers": 2, "num_heads": 2}
TRAIN = {"max_steps": 8, "eval_interval": 4, "eval_batches": 1, "batch_size": 4}


def wrap_calls(on_call: Callable[[str, tuple[Any, ...]], None]) -> Callable[[], None]:
    """Call ``on_call(name, args)`` before each file-system call of :data:`CALLS`; returns the undo."""
    originals = {name: getattr(os, name) for name in CALLS}

    def wrapper(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            on_call(name, args)
            return originals[name](*args, **kwargs)

        return call

    for name in CALLS:
        setattr(os, name, wrapper(name))
    return lambda: [setattr(os, name, real) for name, real in originals.items()] and None


def label(name: str, args: tuple[Any, ...]) -> str:
    """``"fsync model.safetensors"``: the call and the name of the file it acts on (an fd read through /proc)."""
    target = args[0]
    if isinstance(target, int) and Path(f"/proc/self/fd/{target}").exists():
        target = os.readlink(f"/proc/self/fd/{target}")
    return f"{name} {Path(str(target)).name}"


def die_in_child(work: Callable[[], None], at: int) -> int:
    """Run ``work`` in a forked child that ``os._exit``s before its ``at``-th file-system call; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            count = [0]

            def on_call(name: str, args: tuple[Any, ...]) -> None:
                count[0] += 1
                if count[0] == at:
                    os._exit(17)

            wrap_calls(on_call)
            work()
        except BaseException:
            code = 1
        os._exit(code)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child dying at call {at} hung")


def options(out: Path, **kwargs: Any) -> RunOptions:
    corpus = out.parent / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(CORPUS, encoding="utf-8")
    return RunOptions(out, str(corpus), "tiny", progress=False, **kwargs)


def every_visible_step_folder_is_complete(out: Path) -> None:
    for folder in out.glob("step-*"):
        load_checkpoint(folder, need_trainer=True)  # raises for a half-written folder


@pytest.mark.slow
def test_a_kill_at_any_call_of_a_save_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train 8 steps, saving at 4 and 8; die at each call from the save at 8 to the end; load and resume."""
    events: list[str] = []
    weights: dict[int, dict[str, torch.Tensor]] = {}
    real_save = recipe.save_checkpoint

    def recording_save(directory: Any, **kwargs: Any) -> Path:
        events.append("save")
        weights[kwargs["step"]] = {k: v.clone() for k, v in kwargs["model"].state_dict().items()}
        return real_save(directory, **kwargs)

    monkeypatch.setattr(recipe, "save_checkpoint", recording_save)
    undo = wrap_calls(lambda name, args: events.append(label(name, args)))
    whole = train_gpt(options(tmp_path / "whole", model=MODEL, train=TRAIN))
    undo()
    monkeypatch.setattr(recipe, "save_checkpoint", real_save)
    calls = [e for e in events if e != "save"]
    first_call = events.index("save", events.index("save") + 1)  # 1-based: the calls before it, less 1 marker, + 1
    assert len(calls) - first_call >= 10, calls  # files, fsyncs, renames, the old step's removal, the plot

    for at in range(first_call, len(calls) + 1):
        out = tmp_path / f"cut{at}"

        def run(out: Path = out) -> None:
            train_gpt(options(out, model=MODEL, train=TRAIN))

        code = die_in_child(run, at)
        assert code == 17, f"call {at} ({calls[at - 1]}): the child exited with {code}, not at the fault"
        every_visible_step_folder_is_complete(out)
        model, _ = load_gpt(out)
        step = load_checkpoint(out).step
        assert step in (4, 8), f"call {at} ({calls[at - 1]})"
        for name, tensor in model.state_dict().items():
            if name in weights[step]:
                assert torch.equal(tensor, weights[step][name]), f"call {at} ({calls[at - 1]}): {name}"
        resumed = train_gpt(options(out, resume=True))
        assert resumed.history.train == whole.history.train, f"call {at} ({calls[at - 1]})"
        assert resumed.history.val == whole.history.val
        left = {p.name for p in out.iterdir()} - {"loss.png"}  # absent when the kill hit the plot of step 8
        assert left == {"latest.json", "step-000000008"}, f"call {at} ({calls[at - 1]}): {left}"


def tiny_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=8, **MODEL))


def save(folder: Path, net: GPT, step: int) -> None:
    save_checkpoint(
        folder,
        model=net,
        model_config=net.config.to_dict(),
        tokenizer=CharTokenizer("abcdefgh"),
        step=step,
        run="run",
        trainer_tensors={"rng.data": torch.Generator().get_state()},
        trainer_json={"step": step},
    )


@pytest.mark.parametrize("new_step", [3, 5])
def test_a_kill_during_a_re_save_keeps_one_whole_checkpoint(tmp_path: Path, new_step: int) -> None:
    """The save of Ctrl-C right after a validation is a second save of the same step: it must not write over."""
    old, new = tiny_model(0), tiny_model(1)
    calls: list[str] = []
    save(tmp_path / "count", old, 3)
    undo = wrap_calls(lambda name, args: calls.append(label(name, args)))
    save(tmp_path / "count", new, new_step)
    undo()
    assert sum(c.startswith("fsync") for c in calls) >= 7 and any(c.startswith("rmdir") for c in calls), calls
    switch = next(i for i, c in enumerate(calls) if c.startswith("replace .latest.json.")) + 1  # 1-based, as `at`
    for at in range(1, len(calls) + 1):
        folder = tmp_path / f"cut{at}"
        save(folder, old, 3)
        assert die_in_child(lambda folder=folder: save(folder, new, new_step), at) == 17
        every_visible_step_folder_is_complete(folder)
        loaded = load_checkpoint(folder, need_trainer=True)
        assert loaded.step == (3 if at <= switch else new_step), f"call {at} ({calls[at - 1]})"
        which = tiny_model(2)
        load_weights(which, loaded.weights, "model.safetensors")
        assert same(which, old if at <= switch else new), f"call {at} ({calls[at - 1]})"
        ckpt.clean_leftovers(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["latest.json", loaded.directory.name], at


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the fsynced files through /proc")
def test_the_pointer_is_the_last_thing_a_save_changes(tmp_path: Path) -> None:
    """Between the rename of latest.json and the end of the save, only old steps are removed."""
    save(tmp_path, tiny_model(0), 3)
    calls: list[str] = []
    undo = wrap_calls(lambda name, args: calls.append(label(name, args)))
    save(tmp_path, tiny_model(1), 5)
    undo()
    switch = next(i for i, c in enumerate(calls) if c.startswith("replace") and "latest.json" in c)
    assert calls[switch - 1].startswith("fsync .latest.json.")  # the pointer's data is on disk first
    assert calls[switch - 2] == "fsync " + tmp_path.name  # and the renamed step folder
    assert calls[switch - 3] == "rename .step-000000005.tmp"
    after = calls[switch + 1 :]
    assert after[0] == "fsync " + tmp_path.name  # the switch itself is made durable
    assert after[1] == "rename step-000000003"  # hidden in one step, then removed
    assert all(c.split()[0] in ("unlink", "rmdir") for c in after[2:]), after
    assert json.loads((tmp_path / "latest.json").read_text())["folder"] == "step-000000005"
