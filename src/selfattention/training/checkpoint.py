"""Checkpoints that lose nothing and run nothing: safetensors weights, JSON config, JSON tokenizer.

A checkpoint is a folder:

=====================  ===============================================================================
``config.json``        ``{"format", "version", "step", "model": {...}, "trainer": {...}}``, written last
``model.safetensors``  the model's parameters (tied weights stored once)
``trainer.safetensors`` optimizer moments and RNG states, for ``--resume`` (absent in a weights-only save)
``tokenizer.json``     see :mod:`selfattention.training.tokenizer`
=====================  ===============================================================================

Each file is written atomically (a temporary file, then a rename), and each records the training step it
belongs to; loading checks that they agree, so a save interrupted between two files is reported, never
silently mixed. Loading reads tensors and JSON only: no pickle, nothing is executed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfattention.files import atomic_path, write_text
from selfattention.training.tokenizer import Tokenizer, load_tokenizer, save_tokenizer

FORMAT = "selfattention-checkpoint"
VERSION = 1
CONFIG, WEIGHTS, TRAINER, TOKENIZER = "config.json", "model.safetensors", "trainer.safetensors", "tokenizer.json"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read: the config, the weights, the trainer state (or None), the tokenizer."""

    directory: Path
    config: dict[str, Any]
    weights: dict[str, Tensor]
    trainer_tensors: dict[str, Tensor] | None
    tokenizer: Tokenizer

    @property
    def step(self) -> int:
        """The training step the checkpoint was written at."""
        return int(self.config["step"])


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    model_config: dict[str, Any],
    tokenizer: Tokenizer,
    step: int,
    trainer_tensors: dict[str, Tensor] | None = None,
    trainer_json: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``model`` (and optionally the trainer) into ``directory``; returns its path.

    ``model_config`` is JSON (for instance ``{"type": "gpt", ...}``) from which the caller can rebuild the
    model; ``trainer_json`` is the JSON half of the trainer state.
    """
    from safetensors.torch import save_file

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "step": str(step)}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(_unique_tensors(model), str(tmp), metadata=meta)
    if trainer_tensors is not None:
        with atomic_path(folder / TRAINER) as tmp:
            save_file({k: v.contiguous() for k, v in trainer_tensors.items()}, str(tmp), metadata=meta)
    else:
        (folder / TRAINER).unlink(missing_ok=True)
    save_tokenizer(tokenizer, folder / TOKENIZER)
    config = {"format": FORMAT, "version": VERSION, "step": step, "model": model_config, "trainer": trainer_json}
    write_text(folder / CONFIG, json.dumps(config, indent=1) + "\n")
    return folder


def _unique_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor (tied weights) kept once, under its first name."""
    seen: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    return tensors


def load_checkpoint(directory: str | os.PathLike[str], *, need_trainer: bool = False) -> Checkpoint:
    """Read the checkpoint in ``directory``.

    Raises:
        ValueError: naming the file and the problem: missing, truncated or corrupt, not a checkpoint of
            this format, or written at a different step than ``config.json``.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist")
    config = _read_config(folder / CONFIG)
    step = int(config["step"])
    weights = _read_tensors(folder / WEIGHTS, step)
    trainer = None
    if (folder / TRAINER).exists():
        trainer = _read_tensors(folder / TRAINER, step)
    elif need_trainer:
        raise ValueError(f"{folder / TRAINER} is missing: this checkpoint holds weights only and cannot resume")
    path = folder / TOKENIZER
    if not path.exists():
        raise ValueError(f"{path} is missing")
    return Checkpoint(folder, config, weights, trainer, load_tokenizer(path))


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ValueError(f"{path} is missing: {path.parent} is not a checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} config (no 'format': {FORMAT!r})")
    if config.get("version") != VERSION:
        raise ValueError(f"{path} has version {config.get('version')!r}; this package reads version {VERSION}")
    for key in ("step", "model"):
        if key not in config:
            raise ValueError(f"{path} lacks the key {key!r}")
    return config


def _read_tensors(path: Path, step: int) -> dict[str, Tensor]:
    """All tensors of a safetensors file, checking its format and step against ``config.json``."""
    from safetensors import safe_open

    if not path.exists():
        raise ValueError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by this package (metadata {meta})")
    if meta.get("step") != str(step):
        raise ValueError(
            f"{path} is from step {meta.get('step')} but config.json from step {step}: "
            "an interrupted save mixed two checkpoints"
        )
    return tensors


def load_weights(model: nn.Module, weights: dict[str, Tensor], source: str | os.PathLike[str]) -> None:
    """Copy ``weights`` into ``model``, tied weights included.

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
    full = {name: weights.get(name, weights.get(ties.get(name, ""))) for name in expected}
    with torch.no_grad():
        model.load_state_dict(full)


def _ties(model: nn.Module) -> dict[str, str]:
    """Each name of a shared tensor mapped to the first name it was saved under."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in first:
            ties[name] = first[ptr]
        else:
            first[ptr] = name
    return ties
