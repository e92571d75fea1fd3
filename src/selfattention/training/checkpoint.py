"""Checkpoints saved all or nothing, loaded only when intact: safetensors weights, JSON config and tokenizer.

A checkpoint folder (``selfattention train --out DIR``) holds one complete step folder and a pointer to it:

=========================  ======================================================================================
``latest.json``            ``{"format", "version", "step", "folder"}``: the step folder in use, replaced last
``step-000000300/``        one complete save:
``  config.json``           ``{"format", "version", "step", "run", "files", "model", "trainer", "sha256"}``;
                           ``files`` holds the sha256 and size of each file below, ``sha256`` that of
                           the config's other keys (:func:`config_digest`)
``  model.safetensors``     the model's parameters (tied weights stored once)
``  trainer.safetensors``   optimizer moments and RNG states, for ``--resume`` (absent in a weights-only save)
``  tokenizer.json``        see :mod:`selfattention.training.tokenizer`
=========================  ======================================================================================

A save writes a new hidden folder ``.step-000000300.tmp`` (each file flushed and fsynced, ``config.json``
last), renames it to ``step-000000300``, and then replaces ``latest.json`` with one atomic rename: that
rename is the instant the new checkpoint takes over. A kill at any earlier instant leaves ``latest.json``
pointing at the previous step folder, which is untouched; only after the switch are older step folders
removed. :func:`clean_leftovers` (run when training starts) removes what an interrupted save left.

Loading checks the config's types, then its own sha256 (a flipped digit in a learning rate is valid JSON of
the right type; a config saved before the config carried one is read without it), then every file against
the sha256 recorded in ``config.json`` (flipped bytes, truncation, or a file swapped in from another save are
refused), before anything is allocated.
It reads tensors and JSON only: no pickle, nothing is executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfattention.files import fsync_path, read_json, write_durably, write_text
from selfattention.training.tokenizer import Tokenizer, load_tokenizer

FORMAT = "selfattention-checkpoint"
VERSION = 2
LATEST, CONFIG = "latest.json", "config.json"
WEIGHTS, TRAINER, TOKENIZER = "model.safetensors", "trainer.safetensors", "tokenizer.json"
MAX_STEP = 2**53  # steps are JSON integers: keep them exact in any JSON reader


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read: the config, the weights, the trainer state (or None), the tokenizer.

    ``directory`` is the step folder the files were read from.
    """

    directory: Path
    config: dict[str, Any]
    weights: dict[str, Tensor]
    trainer_tensors: dict[str, Tensor] | None
    tokenizer: Tokenizer

    @property
    def step(self) -> int:
        """The training step the checkpoint was written at."""
        return int(self.config["step"])

    @property
    def run(self) -> str:
        """The id of the training run that wrote it (the same for every save of one run and its resumptions)."""
        return str(self.config["run"])


def new_run_id() -> str:
    """A fresh random id for a training run (recorded in each of its checkpoints)."""
    return uuid.uuid4().hex


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    model_config: dict[str, Any],
    tokenizer: Tokenizer,
    step: int,
    run: str | None = None,
    trainer_tensors: dict[str, Tensor] | None = None,
    trainer_json: dict[str, Any] | None = None,
) -> Path:
    """Save a checkpoint of ``model`` (and optionally the trainer) into ``directory``, all or nothing.

    ``model_config`` is JSON (for instance ``{"type": "gpt", ...}``) from which the caller can rebuild the
    model; ``trainer_json`` is the JSON half of the trainer state; ``run`` identifies the training run (a
    new id when not given). See the module docstring for the protocol.

    Returns:
        The new step folder.
    """
    from safetensors.torch import save

    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an integer in [0, {MAX_STEP}], got {step!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    name = _free_name(folder, f"step-{step:09d}")
    staging = folder / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        run = run or new_run_id()
        meta = {"format": FORMAT, "step": str(step), "run": run}
        blobs = {WEIGHTS: save(_unique_tensors(model), metadata=meta)}
        if trainer_tensors is not None:
            blobs[TRAINER] = save({k: v.contiguous() for k, v in trainer_tensors.items()}, metadata=meta)
        blobs[TOKENIZER] = tokenizer.to_json().encode("utf-8")
        for file, data in blobs.items():
            write_durably(staging / file, data)
        files = {file: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for file, data in blobs.items()}
        config = {"format": FORMAT, "version": VERSION, "step": step, "run": run, "files": files}
        config |= {"model": model_config, "trainer": trainer_json}
        config["sha256"] = config_digest(config)
        write_durably(staging / CONFIG, (json.dumps(config, indent=1) + "\n").encode("utf-8"))
        fsync_path(staging)
        os.rename(staging, folder / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(folder)
    pointer = {"format": FORMAT, "version": VERSION, "step": step, "folder": name}
    write_text(folder / LATEST, json.dumps(pointer) + "\n")  # the switch: one atomic, durable rename
    clean_leftovers(folder)
    return folder / name


def _free_name(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... when a step folder of that name exists (a re-save of one step)."""
    candidate, number = name, 1
    while (folder / candidate).exists():
        number += 1
        candidate = f"{name}-{number}"
    return candidate


def clean_leftovers(directory: str | os.PathLike[str]) -> list[str]:
    """Remove what interrupted saves left in a checkpoint folder; returns the names removed.

    Removed: hidden ``.*.tmp`` files and folders (unfinished writes) and step folders that ``latest.json``
    does not point to (each first renamed to a hidden ``.*.removed.tmp``, so that a step folder with a
    visible name is always complete). Nothing else is touched; without a readable ``latest.json`` no step
    folder is removed.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    try:
        current = _read_pointer(folder / LATEST)["folder"] if (folder / LATEST).exists() else None
    except ValueError:
        current = None
    removed = []
    for entry in sorted(folder.iterdir()):
        unfinished = entry.name.startswith(".") and entry.name.endswith(".tmp")
        stale = current is not None and entry.is_dir() and entry.name.startswith("step-") and entry.name != current
        if not (unfinished or stale):
            continue
        if stale:  # hide it first (one rename), so that a visible step folder is always complete
            entry = entry.rename(folder / f".{entry.name}.removed.tmp")
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def _unique_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor (tied weights) kept once, under its first name."""
    ties = _ties(model)
    return {name: t.detach().contiguous() for name, t in model.state_dict().items() if name not in ties}


def holds_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a checkpoint (of any version, intact or not)."""
    folder = Path(directory)
    return (folder / LATEST).exists() or (folder / CONFIG).exists()


def resumable_step(directory: str | os.PathLike[str]) -> int | None:
    """The step ``--resume`` would continue from in ``directory``, or None when it cannot resume there."""
    try:
        return load_checkpoint(directory, need_trainer=True).step
    except (ValueError, OSError):
        return None


def load_checkpoint(directory: str | os.PathLike[str], *, need_trainer: bool = False) -> Checkpoint:
    """Read and verify the checkpoint in ``directory`` (a checkpoint folder, or one of its step folders).

    Raises:
        ValueError: naming the file and the problem: missing, truncated or corrupt (its sha256 differs
            from the one recorded), not a checkpoint of this format or version, from another step or
            run, or without trainer state when ``need_trainer``.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist")
    pointed_step = None
    if (folder / LATEST).exists():
        pointer = _read_pointer(folder / LATEST)
        folder, pointed_step = folder / pointer["folder"], pointer["step"]
        if not folder.is_dir():
            raise ValueError(f"{directory}/{LATEST} points to {folder.name}, which does not exist")
    config = _read_config(folder / CONFIG)
    if pointed_step is not None and pointed_step != config["step"]:
        raise ValueError(f"{directory}/{LATEST} is for step {pointed_step} but {folder / CONFIG} for {config['step']}")
    files = config["files"]
    if TRAINER not in files and need_trainer:
        raise ValueError(f"{folder} holds weights only (no {TRAINER}) and cannot resume; train it again")
    if need_trainer and not isinstance(config["trainer"], dict):
        raise ValueError(f"{folder / CONFIG}: 'trainer' must be an object to resume, got {config['trainer']!r}")
    weights = _read_tensors(folder / WEIGHTS, config)
    trainer = _read_tensors(folder / TRAINER, config) if TRAINER in files else None
    tokenizer_path = folder / TOKENIZER
    _verify(tokenizer_path, files.get(TOKENIZER))
    return Checkpoint(folder, config, weights, trainer, load_tokenizer(tokenizer_path))


def _read_pointer(path: Path) -> dict[str, Any]:
    pointer = read_json(path)
    if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} pointer (no 'format': {FORMAT!r})")
    name, step = pointer.get("folder"), pointer.get("step")
    if not isinstance(name, str) or not name.startswith("step-") or Path(name).name != name:
        raise ValueError(f"{path}: 'folder' must name a step folder, got {name!r}")
    _check_step(path, step)
    return pointer


def _check_step(path: Path, step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"{path}: 'step' must be an integer in [0, {MAX_STEP}], got {str(step)[:40]}")


def _read_config(path: Path) -> dict[str, Any]:
    """The config of a step folder, its keys and their types checked (nothing else is read before)."""
    if not path.exists():
        raise ValueError(f"{path} is missing: {path.parent} is not a checkpoint folder")
    config = read_json(path)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} config (no 'format': {FORMAT!r})")
    if config.get("version") == 1:
        raise ValueError(
            f"{path.parent} was saved by an older version of this package (checkpoint version 1, no checksums); "
            "train it again with `selfattention train --out DIR --overwrite`"
        )
    if config.get("version") != VERSION:
        raise ValueError(f"{path} has version {config.get('version')!r}; this package reads version {VERSION}")
    for key in ("step", "run", "files", "model", "trainer"):
        if key not in config:
            raise ValueError(f"{path} lacks the key {key!r}")
    _check_step(path, config["step"])
    if not isinstance(config["run"], str):
        raise ValueError(f"{path}: 'run' must be a string, got {config['run']!r}")
    if not isinstance(config["model"], dict):
        raise ValueError(f"{path}: 'model' must be an object, got {type(config['model']).__name__}")
    files = config["files"]
    if not isinstance(files, dict) or WEIGHTS not in files or TOKENIZER not in files:
        raise ValueError(f"{path}: 'files' must list {WEIGHTS} and {TOKENIZER} with their checksums")
    for name, record in files.items():
        if name not in (WEIGHTS, TRAINER, TOKENIZER):
            raise ValueError(f"{path}: unknown file {name!r} in 'files'")
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError(f"{path}: 'files' entry {name!r} lacks its sha256")
        size = record.get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{path}: 'files' entry {name!r} has no valid size, got {str(size)[:40]}")
    recorded, digest = config.get("sha256"), config_digest(config)
    if "sha256" in config and recorded != digest:
        raise ValueError(
            f"{path} is corrupt: the sha256 of its content {digest[:16]}... differs from the "
            f"{str(recorded)[:16]}... recorded in it (changed after the save)"
        )
    return config


def config_digest(config: dict[str, Any]) -> str:
    """The sha256 of ``config`` without its own ``"sha256"`` key, as JSON with sorted keys (hex digits).

    Computed from the parsed content, not the bytes, so that it does not depend on the file's layout.
    """
    rest = {key: value for key, value in config.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8")).hexdigest()


def _verify(path: Path, record: dict[str, Any] | None) -> bytes:
    """The bytes of ``path``, after checking its size and sha256 against ``record`` from ``config.json``."""
    if record is None or not path.exists():
        raise ValueError(f"{path} is missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ValueError(
            f"{path} has {size:,} bytes but {CONFIG} recorded {record['bytes']:,} "
            "(truncated, or changed after the save)"
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise ValueError(
            f"{path} is corrupt: its sha256 {digest[:16]}... differs from the {record['sha256'][:16]}... "
            f"recorded in {CONFIG} (bytes changed or the file replaced after the save)"
        )
    return data


def _read_tensors(path: Path, config: dict[str, Any]) -> dict[str, Tensor]:
    """All tensors of a safetensors file, after checking its checksum, format, step and run."""
    from safetensors.torch import load

    data = _verify(path, config["files"].get(path.name))
    try:
        meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by this package (metadata {meta})")
    if meta.get("step") != str(config["step"]) or meta.get("run") != config["run"]:
        raise ValueError(
            f"{path} is from run {meta.get('run')} step {meta.get('step')} but {CONFIG} from run "
            f"{config['run']} step {config['step']}: files of two checkpoints were mixed"
        )
    return tensors


def check_weights(model: nn.Module, weights: dict[str, Tensor], source: str | os.PathLike[str]) -> None:
    """Check that ``weights`` has exactly the tensors of ``model`` with their shapes and dtypes.

    ``model`` may live on the ``meta`` device (nothing allocated), so that a config is checked against
    its weights before a real model is built.

    Raises:
        ValueError: naming ``source`` and the missing, unexpected or differently shaped tensors.
    """
    expected = model.state_dict()
    ties = _ties(model)
    missing = [k for k in expected if k not in weights and ties.get(k) not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [name for name in expected if name in weights and weights[name].shape != expected[name].shape]
    if wrong:
        name = wrong[0]
        raise ValueError(
            f"{source}: tensor {name} has shape {tuple(weights[name].shape)}, the model expects "
            f"{tuple(expected[name].shape)} ({len(wrong)} tensor(s) differ in shape)"
        )
    dtypes = [name for name in expected if name in weights and weights[name].dtype != expected[name].dtype]
    if dtypes:
        name = dtypes[0]
        raise ValueError(f"{source}: tensor {name} is {weights[name].dtype}, the model expects {expected[name].dtype}")


def load_weights(model: nn.Module, weights: dict[str, Tensor], source: str | os.PathLike[str]) -> None:
    """Copy ``weights`` into ``model``, tied weights included, after :func:`check_weights`.

    Raises:
        ValueError: naming ``source`` and the missing, unexpected or differently shaped tensors.
    """
    check_weights(model, weights, source)
    ties = _ties(model)
    # check_weights has made sure that each name is in weights, or else the name it is tied to
    full = {name: weights[name] if name in weights else weights[ties[name]] for name in model.state_dict()}
    with torch.no_grad():
        model.load_state_dict(full)


def _ties(model: nn.Module) -> dict[str, str]:
    """Each name of a shared parameter or buffer mapped to the first name it was saved under.

    Sharing is read from object identity (not storage addresses), so it works on the ``meta`` device too.
    """
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            ties[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return ties
