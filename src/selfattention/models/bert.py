"""A BERT-style encoder whose self-attention is :class:`selfattention.modules.MultiHeadAttention`.

The architecture of BERT (Devlin et al., 2019) as the ``bert`` entries of a Hugging Face ``config.json``
describe it, for inference (no dropout, no pooler head):

1. embeddings: ``word[id] + position[t] + token_type[type]``, then LayerNorm,          ``(B, T) -> (B, T, C)``
2. ``num_layers`` post-norm blocks, each
   ``x = LayerNorm(x + out_proj(attention(x)))`` then ``x = LayerNorm(x + W2 GELU(W1 x))``.

The attention is not causal: every token attends to every real token of its own sentence. Padding is given
as ``attention_mask (B, T)``, boolean ``True`` = a real token (the package's convention; Hugging Face's
integer ``attention_mask`` of 1s and 0s means the same and is accepted too).

Weights come from a Hugging Face ``BertModel`` state dict (e.g. a ``model.safetensors`` file) through
:func:`load_hf_state_dict`: ``attention.self.query/key/value`` become ``W_query/W_key/W_value`` and
``attention.output.dense`` becomes ``out_proj`` of our module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfattention.modules import MultiHeadAttention


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder (the names of Hugging Face's ``config.json`` where they differ)."""

    vocab_size: int = 30522
    hidden_size: int = 384  # C
    num_hidden_layers: int = 6
    num_attention_heads: int = 12  # H
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
        """Read the fields above from a ``config.json`` dict, checking that it describes this architecture.

        Raises:
            ValueError: a model type, activation or position embedding this encoder does not implement.
        """
        expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
        for name, want in expected.items():
            got = config.get(name, want)
            if got != want:
                raise ValueError(f"config {name} is {got!r}; this encoder implements only {want!r}")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """:meth:`from_dict` on the JSON file at ``path``."""
        with open(path, encoding="utf-8") as file:
            return cls.from_dict(json.load(file))


@dataclass(frozen=True)
class EncoderOutput:
    """The hidden states of every layer.

    Attributes:
        hidden_states: ``num_layers + 1`` tensors ``(B, T, C)``: the embedding output, then each block's.
        attention_mask: ``(B, T)`` boolean, ``True`` = a real token.
    """

    hidden_states: tuple[Tensor, ...]
    attention_mask: Tensor

    @property
    def last_hidden_state(self) -> Tensor:
        """The output of the last block, ``(B, T, C)``."""
        return self.hidden_states[-1]


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, width)
        self.token_type = nn.Embedding(config.type_vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """``input_ids (B, T)``, ``token_type_ids (B, T)`` -> ``(B, T, C)``."""
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)  # (T,)
        summed = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.norm(summed)


class BertLayer(nn.Module):
    """One post-norm block: self-attention and a GELU MLP, each added to its input and normalised."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.attention = MultiHeadAttention(
            width,
            width,
            config.max_position_embeddings,
            0.0,
            config.num_attention_heads,
            qkv_bias=True,
            causal=False,
        )
        self.attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(width, config.intermediate_size)
        self.activation = nn.GELU()  # the exact (erf) GELU, BERT's "gelu"
        self.output = nn.Linear(config.intermediate_size, width)
        self.output_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        """``x (B, T, C)``, ``key_padding_mask (B, T)`` (``True`` = real token) -> ``(B, T, C)``."""
        attended = self.attention(x, key_padding_mask=key_padding_mask)
        assert isinstance(attended, Tensor)
        x = self.attention_norm(x + attended)
        return self.output_norm(x + self.output(self.activation(self.intermediate(x))))


class BertEncoder(nn.Module):
    """Embeddings and ``num_hidden_layers`` blocks; returns every layer's hidden states.

    >>> encoder = BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2,
    ...                                  num_attention_heads=2, intermediate_size=16))
    >>> out = encoder(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    >>> len(out.hidden_states), out.last_hidden_state.shape
    (3, torch.Size([2, 3, 8]))
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode a batch of token ids.

        Args:
            input_ids: ``(B, T)`` integer token ids, ``T <= max_position_embeddings``.
            attention_mask: ``(B, T)``, ``True`` (or 1) = a real token, ``False`` (or 0) = padding;
                ``None``: every token is real.
            token_type_ids: ``(B, T)`` segment ids; ``None``: all 0 (a single sentence).

        Returns:
            An :class:`EncoderOutput` with ``num_hidden_layers + 1`` hidden states ``(B, T, C)``.

        Raises:
            ValueError: a bad shape, a sequence longer than the position table, an id outside the vocabulary.
        """
        ids = _check_ids(input_ids, self.config)
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        hidden = [self.embeddings(ids, types)]
        for layer in self.layers:
            hidden.append(layer(hidden[-1], mask))
        return EncoderOutput(hidden_states=tuple(hidden), attention_mask=mask)


def _check_ids(input_ids: Tensor, config: BertConfig) -> Tensor:
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer (batch, tokens), got {input_ids.dtype} {tuple(input_ids.shape)}")
    length = input_ids.shape[-1]
    if length > config.max_position_embeddings:
        raise ValueError(f"{length} word pieces exceed the {config.max_position_embeddings} positions the model has")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(
            f"token ids must be in [0, {config.vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}"
        )
    return input_ids


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence vectors as sentence-transformers' mean pooling defines them, L2-normalised.

    Args:
        hidden: token vectors ``(B, T, C)``.
        attention_mask: ``(B, T)``, ``True`` (or 1) = a real token; padding is left out of the mean.

    Returns:
        ``(B, C)`` unit vectors: the mean of each sentence's real token vectors, divided by its norm.
    """
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T) -> (B, T, 1)
    # (B, C): the mean times the number of real tokens, a positive factor that the normalisation divides out
    summed = (hidden * weights).sum(dim=1)
    return nn.functional.normalize(summed, dim=-1)  # L2


# Hugging Face BertModel names -> ours, per block; ``{i}`` is the block index.
_LAYER_NAMES = {
    "attention.self.query": "attention.W_query",
    "attention.self.key": "attention.W_key",
    "attention.self.value": "attention.W_value",
    "attention.output.dense": "attention.out_proj",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
}
# In a BertModel file but not used by the encoder: a constant buffer and the [CLS] pooler head, which
# sentence-transformers' mean pooling does not use either.
_UNUSED_PREFIXES = ("embeddings.position_ids", "pooler.")


def hf_name(name: str) -> str | None:
    """Our parameter name for a Hugging Face ``BertModel`` one; ``None`` for entries the encoder does not use.

    >>> hf_name("encoder.layer.3.attention.self.query.weight")
    'layers.3.attention.W_query.weight'

    Raises:
        KeyError: a name this architecture does not have.
    """
    name = name.removeprefix("bert.")
    if name.startswith(_UNUSED_PREFIXES):
        return None
    stem, _, kind = name.rpartition(".")
    if stem in _EMBEDDING_NAMES:
        return f"{_EMBEDDING_NAMES[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["encoder", "layer"] and parts[3] in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{kind}"
    raise KeyError(f"unexpected weight {name!r} for a BERT encoder")


def load_hf_state_dict(encoder: BertEncoder, tensors: Mapping[str, Tensor]) -> None:
    """Copy a Hugging Face ``BertModel`` state dict into ``encoder``, every parameter accounted for.

    Raises:
        ValueError: a weight missing or unexpected (naming them), or of the wrong shape.
    """
    renamed: dict[str, Tensor] = {}
    unexpected = []
    for name, tensor in tensors.items():
        try:
            ours = hf_name(name)
        except KeyError:
            unexpected.append(name)
            continue
        if ours is not None:
            renamed[ours] = tensor
    missing = sorted(set(encoder.state_dict()) - set(renamed))
    if missing or unexpected:
        raise ValueError(f"weights do not fit the encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        encoder.load_state_dict(renamed, strict=True)
    except RuntimeError as error:  # a shape mismatch
        raise ValueError(" ".join(str(error).split())) from error
