"""Checkpoints: a round trip that loses nothing, saves that are all or nothing, and clear errors for bad folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from selfattention.models.gpt import GPT, GPTConfig
from selfattention.training import checkpoint as ckpt
from selfattention.training.checkpoint import (
    MAX_STEP,
    clean_leftovers,
    holds_checkpoint,
    load_checkpoint,
    load_weights,
    resumable_step,
    save_checkpoint,
)
from selfattention.training.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = CharTokenizer("abcdefgh")


def model(**overrides: Any) -> GPT:
    config = {"vocab_size": 8, "context_length": 16, "emb_dim": 16, "num_layers": 2, "num_heads": 2}
    return GPT(GPTConfig(**{**config, **overrides}))


def save(folder: Path, net: GPT, step: int = 3, *, trainer: bool = True, run: str = "run-a") -> Path:
    tensors = {"rng.data": torch.Generator().manual_seed(1).get_state(), "optimizer.0.exp_avg": torch.ones(2)}
    return save_checkpoint(
        folder,
        model=net,
        model_config=net.config.to_dict(),
        tokenizer=TOKENIZER,
        step=step,
        run=run,
        trainer_tensors=tensors if trainer else None,
        trainer_json={"step": step} if trainer else None,
    )


def step_folder(folder: Path) -> Path:
    return folder / json.loads((folder / "latest.json").read_text())["folder"]


def edit_config(folder: Path, change: Any, *, seal: bool = True) -> None:
    """Apply ``change`` to the config; ``seal`` records the changed content's sha256, as a save would."""
    path = step_folder(folder) / "config.json"
    config = json.loads(path.read_text())
    change(config)
    if seal and "sha256" in config:  # "1e999" as the number the file will hold
        config["sha256"] = ckpt.config_digest(json.loads(json.dumps(config).replace('"1e999"', "1e999")))
    path.write_text(json.dumps(config).replace('"1e999"', "1e999"))  # a number JSON reads as inf


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_round_trip_restores_every_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = model()
    written = save(tmp_path / "ckpt", net)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.json", "step-000000003"]
    assert written == tmp_path / "ckpt" / "step-000000003"
    assert sorted(p.name for p in written.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer.safetensors",
    ]
    for loaded in (load_checkpoint(tmp_path / "ckpt", need_trainer=True), load_checkpoint(written)):
        assert loaded.step == 3
        assert loaded.run == "run-a"
        assert loaded.directory == written
        assert "out_head.weight" not in loaded.weights  # tied to tok_emb.weight: stored once
        fresh = model()
        load_weights(fresh, loaded.weights, "model.safetensors")
        assert same_weights(net, fresh)
        assert fresh.out_head.weight is fresh.tok_emb.weight
        assert loaded.trainer_tensors is not None
        assert torch.equal(loaded.trainer_tensors["optimizer.0.exp_avg"], torch.ones(2))
        assert loaded.tokenizer.encode("bad") == TOKENIZER.encode("bad")


def test_a_new_save_replaces_the_old_one_whole(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first, second = model(), model()
    save(tmp_path, first, step=3)
    save(tmp_path, second, step=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000005"]
    fresh = model()
    load_weights(fresh, load_checkpoint(tmp_path).weights, "model.safetensors")
    assert same_weights(fresh, second) and not same_weights(fresh, first)


def test_a_second_save_of_the_same_step_does_not_write_over_the_first(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first, second = model(), model()
    save(tmp_path, first, step=3)
    folder = save(tmp_path, second, step=3)
    assert folder.name == "step-000000003-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000003-2"]
    fresh = model()
    load_weights(fresh, load_checkpoint(tmp_path).weights, "model.safetensors")
    assert same_weights(fresh, second)


def test_a_weights_only_save_leaves_no_stale_trainer_state(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    save(tmp_path, model(), step=3, trainer=False)  # the same step: the old trainer file must not survive
    assert not (step_folder(tmp_path) / "trainer.safetensors").exists()
    assert load_checkpoint(tmp_path).trainer_tensors is None
    with pytest.raises(ValueError, match=r"holds weights only \(no trainer.safetensors\) and cannot resume"):
        load_checkpoint(tmp_path, need_trainer=True)
    assert resumable_step(tmp_path) is None


def test_written_files_and_folders_get_the_usual_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save(tmp_path, model())
    finally:
        os.umask(old)
    for path in [tmp_path / "latest.json", *step_folder(tmp_path).iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path.name
    assert step_folder(tmp_path).stat().st_mode & 0o777 == 0o755


def test_an_interrupt_inside_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A second Ctrl-C lands while the trainer file is written: the save is abandoned whole."""
    torch.manual_seed(0)
    first = model()
    save(tmp_path, first, step=3)
    real = ckpt.write_durably

    def interrupted(path: Path, data: bytes) -> None:
        if path.name == "trainer.safetensors":
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(ckpt, "write_durably", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, model(), step=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000003"]
    fresh = model()
    load_weights(fresh, load_checkpoint(tmp_path, need_trainer=True).weights, "model.safetensors")
    assert same_weights(fresh, first)
    assert resumable_step(tmp_path) == 3


def test_leftovers_of_a_killed_save_are_removed_and_nothing_else(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    (tmp_path / ".step-000000009.tmp").mkdir()
    (tmp_path / ".step-000000009.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".latest.json.x1y2.tmp").write_text("{")
    (tmp_path / "step-000000001").mkdir()  # an old step the pointer had already left
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "loss.png").write_bytes(b"png")
    removed = clean_leftovers(tmp_path)
    assert removed == [".latest.json.x1y2.tmp", ".step-000000009.tmp", ".step-000000001.removed.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "loss.png", "notes.txt", "step-000000003"]


def test_leftovers_without_a_pointer_keep_every_step_folder(tmp_path: Path) -> None:
    (tmp_path / "step-000000001").mkdir()
    (tmp_path / ".step-000000002.tmp").mkdir()
    assert clean_leftovers(tmp_path) == [".step-000000002.tmp"]
    assert (tmp_path / "step-000000001").is_dir()


# Damaged folders: each one clear ValueError naming the file -------------------------------------------------


def flip_tensor_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) - count - 8  # inside the tensor data, past the JSON header
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused(tmp_path: Path) -> None:
    save(tmp_path, model())
    path = step_folder(tmp_path) / "model.safetensors"
    recorded = json.loads((path.parent / "config.json").read_text())["files"][path.name]["sha256"]
    flip_tensor_bytes(path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=rf"safetensors is corrupt: its sha256 {actual[:16]}\.\.\. differs from the "):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=rf"differs from the {recorded[:16]}\.\.\. recorded in config.json \(bytes"):
        load_checkpoint(tmp_path)


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    save(tmp_path, model())
    for name in ("model.safetensors", "trainer.safetensors", "tokenizer.json"):
        path = step_folder(tmp_path) / name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        message = rf"{name} has [\d,]+ bytes but config.json recorded [\d,]+ \(truncated, or changed after the save\)"
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path)
        path.write_bytes(whole)


def test_truncated_config_names_the_file(tmp_path: Path) -> None:
    save(tmp_path, model())
    path = step_folder(tmp_path) / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(truncated or corrupt\?\)"):
        load_checkpoint(tmp_path)


def test_a_trainer_file_from_another_run_at_the_same_step_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "a", model(), step=3, run="run-a")
    save(tmp_path / "b", model(), step=3, run="run-b")
    theirs = (step_folder(tmp_path / "b") / "trainer.safetensors").read_bytes()
    (step_folder(tmp_path / "a") / "trainer.safetensors").write_bytes(theirs)
    with pytest.raises(ValueError, match=r"trainer.safetensors (is corrupt|has [\d,]+ bytes)"):
        load_checkpoint(tmp_path / "a", need_trainer=True)

    def forge(config: dict[str, Any]) -> None:  # even with its checksum recorded, the run id differs
        config["files"]["trainer.safetensors"] = {"sha256": hashlib.sha256(theirs).hexdigest(), "bytes": len(theirs)}

    edit_config(tmp_path / "a", forge)
    with pytest.raises(ValueError, match=r"safetensors is from run run-b step 3 but config.json from run run-a"):
        load_checkpoint(tmp_path / "a", need_trainer=True)


def test_a_safetensors_file_not_written_here_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save as to_bytes

    save(tmp_path, model())
    net = model()
    foreign = to_bytes({k: v.contiguous() for k, v in ckpt._unique_tensors(net).items()})  # no metadata
    (step_folder(tmp_path) / "model.safetensors").write_bytes(foreign)

    def record(config: dict[str, Any]) -> None:
        config["files"]["model.safetensors"] = {"sha256": hashlib.sha256(foreign).hexdigest(), "bytes": len(foreign)}

    edit_config(tmp_path, record)
    with pytest.raises(ValueError, match=r"model.safetensors was not written by this package"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(step="1e999"), r"'step' must be an integer .* got inf"),
        (lambda c: c.update(step=2.0), r"'step' must be an integer"),
        (lambda c: c.update(step=True), r"'step' must be an integer"),
        (lambda c: c.update(step=10**400), rf"config.json: 'step' must be an integer in \[0, {2**53}\], got 10{{39}}$"),
        (lambda c: c.pop("files"), r"lacks the key 'files'"),
        (lambda c: c["files"].pop("model.safetensors"), r"'files' must list model.safetensors"),
        (
            lambda c: c["files"]["model.safetensors"].update(bytes="12"),
            r"'model.safetensors' has no valid size, got 12$",
        ),
        (lambda c: c["files"]["model.safetensors"].update(bytes="7" * 50), r"has no valid size, got 7{40}$"),
        (
            lambda c: c["files"].update({"model.safetensors": "ab12"}),
            r"'files' entry 'model.safetensors' lacks its sha256",
        ),
        (lambda c: c["files"]["tokenizer.json"].pop("sha256"), r"'files' entry 'tokenizer.json' lacks its sha256"),
        (
            lambda c: c["files"]["tokenizer.json"].update(bytes=0),
            r"tokenizer.json has [\d,]+ bytes but config.json recorded 0 ",
        ),
        (lambda c: c["files"].update(extra={}), r"unknown file 'extra'"),
        (lambda c: c.update(model=[1]), r"'model' must be an object, got list$"),
        (lambda c: c.update(run=7), r"'run' must be a string"),
        (
            lambda c: c.update(version=1),
            r"older version of this package .*; train it again with `selfattention train --out DIR --overwrite`$",
        ),
        (lambda c: c.update(version=3), r"has version 3; this package reads version 2"),
        (lambda c: c.update(format="other"), r"is not a selfattention-checkpoint config"),
    ],
)
def test_bad_configs_are_named(tmp_path: Path, change: Any, message: str) -> None:
    save(tmp_path, model())
    edit_config(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path)


def test_a_config_changed_after_the_save_is_refused(tmp_path: Path) -> None:
    """A flipped digit is still valid JSON of the right type: only the config's own sha256 can tell."""
    save(tmp_path, model(), step=3)
    path = step_folder(tmp_path) / "config.json"
    recorded = json.loads(path.read_text())["sha256"]
    edit_config(tmp_path, lambda c: c["trainer"].update(step=4), seal=False)
    message = (
        rf"config.json is corrupt: the sha256 of its content [0-9a-f]{{16}}\.\.\. differs from the {recorded[:16]}"
    )
    with pytest.raises(ValueError, match=message + r"\.\.\. recorded in it \(changed after the save\)$"):
        load_checkpoint(tmp_path)
    edit_config(tmp_path, lambda c: c.pop("sha256"), seal=False)  # as saved before configs carried one
    assert load_checkpoint(tmp_path).config["trainer"] == {"step": 4}


def test_json_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    save(tmp_path, model())
    path = step_folder(tmp_path) / "config.json"
    for text, message in [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"step": 1e999}', "not a selfattention-checkpoint config"),
        ('{"step": NaN}', "NaN is not valid JSON"),
        ('{"step": ' + "9" * 5000 + "}", "not valid JSON"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path)
    (tmp_path / "latest.json").write_text('{"format": "selfattention-checkpoint", "step": 1e999, "folder": "x"}')
    with pytest.raises(ValueError, match=r"'folder' must name a step folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest.json").write_text('{"format": "selfattention-checkpoint", "step": 1e999, "folder": "step-1"}')
    with pytest.raises(ValueError, match=r"latest.json: 'step' must be an integer .* got inf"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest.json").write_text('{"format": "selfattention-checkpoint", "step": 3, "folder": "step-1"}')
    with pytest.raises(ValueError, match=r"points to step-1, which does not exist"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest.json").write_text('{"format": "selfattention-checkpoint", "step": 3, "folder": "../x"}')
    with pytest.raises(ValueError, match=r"'folder' must name a step folder"):
        load_checkpoint(tmp_path)


def test_mismatched_shapes_name_the_tensor(tmp_path: Path) -> None:
    save(tmp_path, model())
    weights = load_checkpoint(tmp_path).weights
    with pytest.raises(
        ValueError, match=r"^model.safetensors: tensor tok_emb.weight has shape \(8, 16\), the model expects"
    ):
        load_weights(model(emb_dim=32), weights, "model.safetensors")
    with pytest.raises(
        ValueError, match=r"^model.safetensors does not match the model: missing \['blocks.2.*unexpected \[\]"
    ):
        load_weights(model(num_layers=3), weights, "model.safetensors")


def test_weights_of_a_deeper_model_are_refused_not_truncated(tmp_path: Path) -> None:
    """The reverse direction: 3-layer weights must not load silently into a 2-layer model."""
    save(tmp_path, model(num_layers=3))
    weights = load_checkpoint(tmp_path).weights
    with pytest.raises(ValueError, match=r"does not match the model: missing \[\], unexpected \['blocks.2"):
        load_weights(model(num_layers=2), weights, "model.safetensors")


def test_other_dtypes_are_refused(tmp_path: Path) -> None:
    save(tmp_path, model())
    weights = {k: v.double() for k, v in load_checkpoint(tmp_path).weights.items()}
    first = next(iter(model().state_dict()))  # every tensor differs: the error names the first
    with pytest.raises(
        ValueError, match=rf"^model.safetensors: tensor {first} is torch.float64, the model expects torch.float32$"
    ):
        load_weights(model(), weights, "model.safetensors")


def test_missing_pieces(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint folder .* does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"config.json is missing: .* is not a checkpoint folder"):
        load_checkpoint(tmp_path)
    save(tmp_path, model())
    (step_folder(tmp_path) / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match=r"latest.json is not a selfattention-checkpoint pointer"):
        load_checkpoint(tmp_path)


def test_bad_steps_are_refused_when_saving(tmp_path: Path) -> None:
    for step in (-1, 2.0, True, 2**60):
        with pytest.raises(ValueError, match=r"step must be an integer in \[0, "):
            save(tmp_path, model(), step=step)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# The edges of what a save accepts, and what it writes ---------------------------------------------------------


def test_the_first_and_the_largest_step_round_trip(tmp_path: Path) -> None:
    """Step 0 (saved before any training) and 2**53 (the largest integer every JSON reader keeps exact)."""
    for step in (0, MAX_STEP):
        folder = tmp_path / str(step)
        written = save(folder, model(), step=step)
        assert written.name == f"step-{step:09d}"
        assert load_checkpoint(folder, need_trainer=True).step == step
    with pytest.raises(ValueError, match=rf"step must be an integer in \[0, {MAX_STEP}\], got {MAX_STEP + 1}"):
        save(tmp_path / "over", model(), step=MAX_STEP + 1)


def test_a_save_creates_the_missing_parent_folders(tmp_path: Path) -> None:
    save(tmp_path / "runs" / "today" / "ckpt", model())
    assert load_checkpoint(tmp_path / "runs" / "today" / "ckpt").step == 3


def test_a_staging_folder_left_by_a_killed_save_of_the_same_step_is_replaced(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    staging = tmp_path / ".step-000000005.tmp"  # what a kill in the middle of the save of step 5 left
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    torch.manual_seed(1)
    net = model()
    save(tmp_path, net, step=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000005"]
    fresh = model()
    load_weights(fresh, load_checkpoint(tmp_path).weights, "model.safetensors")
    assert same_weights(fresh, net)


def test_the_json_files_hold_what_the_module_docstring_documents(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    pointer = json.loads((tmp_path / "latest.json").read_text())
    assert pointer == {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 3, "folder": "step-000000003"}
    text = (step_folder(tmp_path) / "config.json").read_text()
    config = json.loads(text)
    assert list(config) == ["format", "version", "step", "run", "files", "model", "trainer", "sha256"]
    rest = {key: value for key, value in config.items() if key != "sha256"}  # the documented serialisation
    assert config["sha256"] == hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8")).hexdigest()
    assert text == json.dumps(config, indent=1) + "\n"  # one key per line, one space a level: diffs read well


def test_a_failed_cleanup_does_not_hide_the_error_that_stopped_the_save(tmp_path: Path, monkeypatch) -> None:
    """The disk fills up while the trainer file is written, and the staging folder is gone by the time of the
    cleanup (another process removed it): the caller sees the disk-full error, nothing about the cleanup."""
    save(tmp_path, model(), step=3)
    real_write, real_rmtree = ckpt.write_durably, shutil.rmtree

    def disk_full(path: Path, data: bytes) -> None:
        if path.name == "trainer.safetensors":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    def raced(path: Any, *args: Any, **kwargs: Any) -> None:
        real_rmtree(path, ignore_errors=True)  # the other process
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_durably", disk_full)
    monkeypatch.setattr(shutil, "rmtree", raced)
    with pytest.raises(OSError, match="No space left on device"):
        save(tmp_path, model(), step=5)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000003"]


def test_holds_checkpoint_sees_a_checkpoint_folder_and_a_step_folder(tmp_path: Path) -> None:
    assert not holds_checkpoint(tmp_path)
    save(tmp_path, model())
    assert holds_checkpoint(tmp_path)  # latest.json only, no config.json beside it
    assert holds_checkpoint(step_folder(tmp_path))  # config.json only
    (tmp_path / "latest.json").unlink()
    assert not holds_checkpoint(tmp_path)


# Leftovers: only what interrupted saves left, even when another process cleans at the same time --------------


def test_leftovers_keep_files_that_are_only_hidden_or_only_named_tmp(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    (tmp_path / ".gitignore").write_text("*\n")
    (tmp_path / "draft.tmp").write_text("mine")
    (tmp_path / ".cache.tmp").write_text("a leftover")
    assert clean_leftovers(tmp_path) == [".cache.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore", "draft.tmp", "latest.json", "step-000000003"]


def test_leftovers_with_an_unreadable_pointer_keep_every_step_folder(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    (tmp_path / "step-000000001").mkdir()
    (tmp_path / "latest.json").write_text('{"format": "other"}')
    assert clean_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000001", "step-000000003"]


def test_leftovers_removed_meanwhile_by_another_process_are_no_error(tmp_path: Path, monkeypatch) -> None:
    """Two trainers started on one folder both clean it: each removal may find its target already gone."""
    save(tmp_path, model(), step=3)
    (tmp_path / "step-000000001").mkdir()
    (tmp_path / "step-000000001" / "model.safetensors").write_bytes(b"old")
    (tmp_path / ".latest.json.x1y2.tmp").write_text("{")
    real_rmtree, real_unlink = shutil.rmtree, Path.unlink

    def raced_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        real_rmtree(path, ignore_errors=True)  # the other process
        real_rmtree(path, *args, **kwargs)

    def raced_unlink(path: Path, *args: Any, **kwargs: Any) -> None:
        real_unlink(path, missing_ok=True)  # the other process
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", raced_rmtree)
    monkeypatch.setattr(Path, "unlink", raced_unlink)
    assert clean_leftovers(tmp_path) == [".latest.json.x1y2.tmp", ".step-000000001.removed.tmp"]
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000003"]


# Loading: the remaining errors name what is wrong ---------------------------------------------------------


def test_a_pointer_and_a_config_of_different_steps_are_refused(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    pointer = json.loads((tmp_path / "latest.json").read_text())
    (tmp_path / "latest.json").write_text(json.dumps({**pointer, "step": 4}))
    config = step_folder(tmp_path) / "config.json"
    with pytest.raises(ValueError, match=rf"latest.json is for step 4 but {config} for 3$"):
        load_checkpoint(tmp_path)


def test_an_unreadable_safetensors_file_is_named(tmp_path: Path) -> None:
    save(tmp_path, model())
    garbage = b"\xff" * 64  # a header length of 2**64 - 1 bytes
    (step_folder(tmp_path) / "model.safetensors").write_bytes(garbage)
    record = {"sha256": hashlib.sha256(garbage).hexdigest(), "bytes": len(garbage)}
    edit_config(tmp_path, lambda c: c["files"].update({"model.safetensors": record}))
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file: "):
        load_checkpoint(tmp_path)


def test_a_mismatch_names_at_most_five_tensors_of_each_kind(tmp_path: Path) -> None:
    save(tmp_path / "one", model(num_layers=1))
    save(tmp_path / "three", model(num_layers=3))
    one, three = load_checkpoint(tmp_path / "one").weights, load_checkpoint(tmp_path / "three").weights
    with pytest.raises(ValueError, match=r"missing \['blocks\.1\..*\], unexpected \[\]$") as missing:
        load_weights(model(num_layers=3), one, "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['blocks\.[12]\..*\]$") as unexpected:
        load_weights(model(num_layers=1), three, "model.safetensors")
    for error in (missing, unexpected):
        assert str(error.value).count("'blocks.") == 5  # of the 2 layers' worth of tensors (in no set order)


class SharedTable(torch.nn.Module):
    """Two submodules holding one buffer (as models that share a rotary table between layers do)."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.arange(6.0).reshape(2, 3)
        self.first, self.second = torch.nn.Module(), torch.nn.Module()
        self.first.register_buffer("table", table)
        self.second.register_buffer("table", table)
        self.proj = torch.nn.Linear(3, 3)


def test_a_shared_buffer_is_stored_once_and_loaded_into_both_places(tmp_path: Path) -> None:
    net = SharedTable()
    net.first.table.mul_(-2.0)
    save_checkpoint(tmp_path, model=net, model_config={}, tokenizer=TOKENIZER, step=1)
    loaded = load_checkpoint(tmp_path)
    assert sorted(loaded.weights) == ["first.table", "proj.bias", "proj.weight"]
    fresh = SharedTable()
    load_weights(fresh, loaded.weights, "model.safetensors")
    assert same_weights(fresh, net)
    assert fresh.second.table is fresh.first.table
