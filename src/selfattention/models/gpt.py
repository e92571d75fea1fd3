"""A small decoder-only transformer (GPT) built from :class:`selfattention.modules.MultiHeadAttention`.

Token embeddings plus learned position embeddings (or rotary position embeddings, RoPE, applied to the
queries and keys instead), ``num_layers`` pre-norm blocks ``x + attn(norm(x))``, ``x + mlp(norm(x))``, a
final norm and an output head whose weight is the token embedding matrix (weight tying).

``model(idx, targets)`` returns ``(logits, loss)``: ``idx`` is ``(B, T)`` token ids, ``logits`` is
``(B, T, V)`` and ``loss`` the mean cross-entropy of predicting ``targets[b, t]`` (the token after
``idx[b, t]``) in nats per token, or ``None`` without targets. With ``kv_caches`` (from
:meth:`GPT.make_kv_caches`) the tokens continue the cached ones: positions start at the cached length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfattention.kv_cache import KVCache, rotate_half
from selfattention.modules import MultiHeadAttention


@dataclass
class GPTConfig:
    """The shape of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids ``V``.
        context_length: the most tokens the model sees at once (positions ``0 .. context_length - 1``).
        emb_dim: model width ``C``. num_layers: transformer blocks. num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``G`` (``None``: ``H``; fewer is grouped-query attention).
        dropout: on embeddings, attention weights and block outputs, in training only.
        qkv_bias: biases in the query/key/value projections.
        rope: rotary position embeddings on queries and keys instead of learned position embeddings.
        rope_base: the RoPE frequency base.
        backend: attention backend of every layer (``"auto"`` or a name in :data:`selfattention.BACKENDS`).
    """

    vocab_size: int
    context_length: int = 64
    emb_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    dropout: float = 0.0
    qkv_bias: bool = False
    rope: bool = False
    rope_base: float = 10000.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.emb_dim % self.num_heads != 0:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.rope and (self.emb_dim // self.num_heads) % 2 != 0:
            raise ValueError(f"RoPE needs an even head width, got {self.emb_dim // self.num_heads}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, with ``"type": "gpt"``."""
        return {"type": "gpt", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """The config of :meth:`to_dict`.

        Raises:
            ValueError: for another model type or unknown keys.
        """
        values = dict(data)
        kind = values.pop("type", "gpt")
        if kind != "gpt":
            raise ValueError(f"model type {kind!r} is not 'gpt'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(values.keys() - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}")
        return cls(**values)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair of query/key features by an angle proportional to the token's position.

    A :data:`selfattention.modules.Rope` hook: ``rope(query, key, start)`` with ``(B, H, T, D)`` queries and
    ``(B, G, T, D)`` keys whose first token is at position ``start``. Pairs are the two halves of the
    head (the "rotate half" layout).
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, context_length: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inv_freq)  # (L, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, query: Tensor, key: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Rotate ``query`` and ``key`` for positions ``start .. start + T - 1``."""
        length = query.shape[-2]
        cos = self.cos[start : start + length].to(query.dtype)  # (T, D)
        sin = self.sin[start : start + length].to(query.dtype)
        return rotate_half(query, cos, sin), rotate_half(key, cos, sin)


class Block(nn.Module):
    """One pre-norm transformer block: attention, then a 4× MLP with GELU, each added to the residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width = config.emb_dim
        self.norm1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(
            width,
            width,
            config.context_length,
            config.dropout,
            config.num_heads,
            config.qkv_bias,
            num_kv_heads=config.num_kv_heads,
            causal=True,
            backend=config.backend,
        )
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, rope: RotaryEmbedding | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        attended = self.attn(self.norm1(x), kv_cache=kv_cache, rope=rope)
        assert isinstance(attended, Tensor)
        x = x + self.drop(attended)
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """A decoder-only transformer language model; see the module docstring.

    >>> model = GPT(GPTConfig(vocab_size=10, context_length=8, emb_dim=16, num_layers=1, num_heads=2))
    >>> logits, loss = model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    >>> logits.shape, loss.shape
    (torch.Size([2, 5, 10]), torch.Size([]))
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = None if config.rope else nn.Embedding(config.context_length, config.emb_dim)
        self.rope = (
            RotaryEmbedding(config.emb_dim // config.num_heads, config.context_length, config.rope_base)
            if config.rope
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim)
        self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the projections that add to the residual stream by 1/sqrt(2 * layers)
        for name, param in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    @property
    def rotary(self) -> RotaryEmbedding | None:
        """The RoPE tables (``cos``, ``sin``) with ``rope=True``; ``None`` with learned positions."""
        return self.rope

    def make_kv_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One preallocated :class:`KVCache` per layer, ``max_len`` (default ``context_length``) positions."""
        length = self.config.context_length if max_len is None else max_len
        return [cast(Block, block).attn.make_kv_cache(batch_size, length) for block in self.blocks]

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, kv_caches: list[KVCache] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, T, V)`` for token ids ``idx (B, T)``, and the loss against ``targets (B, T)``.

        Raises:
            ValueError: for ids outside the vocabulary, or more tokens (cached plus new) than
                ``context_length``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, tokens), got shape {tuple(idx.shape)}")
        start = kv_caches[0].length if kv_caches else 0
        num_tokens = idx.shape[1]
        if start + num_tokens > self.config.context_length:
            raise ValueError(
                f"{start + num_tokens} tokens ({start} cached + {num_tokens} new) exceed the model's "
                f"context_length={self.config.context_length}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        x = self.tok_emb(idx)  # (B, T) -> (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + num_tokens, device=idx.device))
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_caches[layer] if kv_caches else None, self.rope)
        logits = self.out_head(self.final_norm(x))  # (B, T, C) -> (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss
