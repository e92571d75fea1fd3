"""The pretrained models the command line can load by name, and the error when the extra is missing."""

from __future__ import annotations

import torch

from selfattention.cli.errors import UsageError
from selfattention.pretrained import PretrainedEncoder, PretrainedNotInstalledError, load_minilm

MODELS = {"minilm": load_minilm}


def load_model(name: str, device: torch.device | str = "cpu") -> PretrainedEncoder:
    """The model called ``name`` (a key of :data:`MODELS`), on ``device``.

    Raises:
        UsageError: an unknown name, or the ``pretrained`` extra not installed (saying what to install).
    """
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    try:
        return MODELS[name]().to(device)
    except PretrainedNotInstalledError as error:
        raise UsageError(str(error)) from error
