"""A Llama-family decoder (SmolLM2, Llama 2/3, TinyLlama...) whose attention is our :class:`MultiHeadAttention`.

The architecture as llama.cpp's ``llama`` GGUF files and Hugging Face's ``LlamaForCausalLM`` define it, for
inference:

1. token embeddings ``x = E[idx]``,                                                   ``(B, T) -> (B, T, C)``
2. ``num_layers`` pre-norm blocks ``x = x + attn(RMSNorm(x))``, ``x = x + mlp(RMSNorm(x))`` where ``attn`` is
   causal grouped-query attention (``H`` query heads, ``G`` key/value heads) with rotary positions on the
   queries and keys, and ``mlp`` is SwiGLU, ``W_down(silu(W_gate x) * W_up x)``; no biases anywhere,
3. a final RMSNorm and the output head ``(B, T, C) -> (B, T, V)`` (the embedding matrix when tied).

Padding: ``attention_mask (B, S)`` is boolean, ``True`` = a real token (1/0 integers are accepted too). Left
or right padding both work: each token's position is the number of real tokens before it, as in Hugging
Face's ``generate``, so a padded row gives the logits of the same row unpadded. With ``kv_caches`` (from
:meth:`Llama.make_kv_caches`) the new tokens continue the cached ones, and ``attention_mask`` covers the
cached and the new tokens together.

Weights come from a GGUF file through :func:`selfattention.loaders.gguf.load_gguf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfattention.checks import LOW_PRECISION
from selfattention.kv_cache import rotate_half
from selfattention.modules import KVCache, MultiHeadAttention


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a :class:`Llama` (GGUF metadata ``llama.*`` names in brackets).

    Attributes:
        vocab_size: token ids ``V``. context_length: positions the model was trained on [context_length].
        emb_dim: model width ``C`` [embedding_length]. num_layers: blocks [block_count].
        num_heads: query heads ``H`` [attention.head_count]. num_kv_heads: key/value heads ``G``
            [attention.head_count_kv]. hidden_dim: the SwiGLU width [feed_forward_length].
        rope_base: the RoPE frequency base [rope.freq_base]. rope_factors: ``D / 2`` numbers that divide
            the RoPE frequencies one by one, or None [the tensor ``rope_freqs.weight``: Llama 3.1's long-context
            scaling, which llama.cpp's converter stores as these factors]. norm_eps: RMSNorm's epsilon
            [attention.layer_norm_rms_epsilon]. tie_embeddings: the output head is the embedding matrix.
        backend: attention backend of every layer (``"auto"`` or a name in :data:`selfattention.BACKENDS`).
    """

    vocab_size: int
    context_length: int = 2048
    emb_dim: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    hidden_dim: int = 1536
    rope_base: float = 10000.0
    rope_factors: tuple[float, ...] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.emb_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"emb_dim ({self.emb_dim}) must be divisible by num_heads ({self.num_heads}) and num_heads by "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if (self.emb_dim // self.num_heads) % 2:
            raise ValueError(f"RoPE needs an even head width, got {self.emb_dim // self.num_heads}")
        factors = self.rope_factors
        if factors is not None:
            if len(factors) != self.head_dim // 2:
                raise ValueError(f"rope_factors must hold D / 2 = {self.head_dim // 2} numbers, got {len(factors)}")
            bad = next((i for i, factor in enumerate(factors) if not 0 < factor < math.inf), None)
            if bad is not None:
                raise ValueError(f"rope_factors must be finite and positive, got {factors[bad]} at index {bad}")

    @property
    def head_dim(self) -> int:
        """``D``, the width of one head."""
        return self.emb_dim // self.num_heads


class Rotary(nn.Module):
    """RoPE tables for positions ``0 .. context_length - 1`` in the "rotate half" layout of Hugging Face's Llama.

    The frequencies are ``1 / base ** (2i / D)``, computed as Hugging Face computes them so that the angles
    agree to the last bit, each divided by its entry of ``factors`` when given (as llama.cpp applies a
    file's ``rope_freqs.weight``).
    """

    cos: Tensor
    sin: Tensor

    def __init__(
        self, head_dim: int, context_length: int, base: float, factors: tuple[float, ...] | None = None
    ) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (D/2,)
        if factors is not None:
            inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
        angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inv_freq)  # (L, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def hook(self, positions: Tensor) -> PositionedRope:
        """The :data:`selfattention.modules.Rope` hook for tokens at ``positions (B, T)``."""
        cos = self.cos[positions].unsqueeze(1)  # (B, T) -> (B, 1, T, D), shared by every head
        sin = self.sin[positions].unsqueeze(1)
        return PositionedRope(cos, sin)


class PositionedRope:
    """Rotates queries ``(B, H, T, D)`` and keys ``(B, G, T, D)`` by precomputed per-token angles.

    Each row of the batch has its own positions (padding shifts them), so the hook ignores the single
    ``start`` that :class:`MultiHeadAttention` passes.
    """

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        self.cos, self.sin = cos, sin

    def __call__(self, query: Tensor, key: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """``(query, key)`` rotated."""
        return rotate_half(query, self.cos, self.sin), rotate_half(key, self.cos, self.sin)


class LlamaAttention(MultiHeadAttention):
    """:class:`MultiHeadAttention` projecting queries, keys and values with three products instead of one.

    The base class stacks ``W_query``, ``W_key``, ``W_value`` into one matrix on every call, which is faster
    to train on CPU; for inference, where one token at a time reads every weight once, the copy made for
    stacking costs about a tenth of a decoding step here. Same weights, same names, same numbers.
    """

    def _project(self, x: Tensor) -> tuple[Tensor, ...]:
        """``(B, T, C)`` -> ``(B, T, H * D)``, ``(B, T, G * D)``, ``(B, T, G * D)``."""
        return self.W_query(x), self.W_key(x), self.W_value(x)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last axis: ``(..., C) -> (..., C)``.

    The values of ``nn.RMSNorm`` and of Hugging Face's ``LlamaRMSNorm`` (bit for bit: the same sum, divided
    by ``C``); the sum of squares is one dot product per row, which on the CPU is six times
    faster than their ``pow`` and ``mean`` at 512 tokens.
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., C) -> (..., C)``; half and bfloat16 inputs are computed in float32, as ``nn.RMSNorm`` does."""
        if x.dtype in LOW_PRECISION:  # their sum of squares would overflow or round away
            return self._normalise(x.float(), self.weight.float()).to(x.dtype)
        return self._normalise(x, self.weight)

    def _normalise(self, x: Tensor, weight: Tensor) -> Tensor:
        mean_square = torch.linalg.vecdot(x, x).unsqueeze(-1) / x.shape[-1]  # (..., C) -> (..., 1)
        return weight * (x * torch.rsqrt(mean_square + self.eps))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``W_down(silu(W_gate x) * W_up x)``: ``(B, T, C) -> (B, T, C)`` through width ``hidden_dim``."""

    def __init__(self, width: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden_dim, bias=False)
        self.up = nn.Linear(width, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        return self.down(F.silu(self.gate(x)).mul_(self.up(x)))  # in place: silu's output is ours alone


class LlamaBlock(nn.Module):
    """One pre-norm block: grouped-query attention with RoPE, then SwiGLU, each added to the residual."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        width = config.emb_dim
        self.attn_norm = RMSNorm(width, eps=config.norm_eps)
        self.attn = LlamaAttention(
            width,
            width,
            config.context_length,
            0.0,
            config.num_heads,
            num_kv_heads=config.num_kv_heads,
            causal=True,
            backend=config.backend,
            out_bias=False,
        )
        self.mlp_norm = RMSNorm(width, eps=config.norm_eps)
        self.mlp = SwiGLU(width, config.hidden_dim)

    def forward(
        self, x: Tensor, rope: PositionedRope, key_padding_mask: Tensor | None, kv_cache: KVCache | None
    ) -> Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        attended = self.attn(self.attn_norm(x), key_padding_mask=key_padding_mask, kv_cache=kv_cache, rope=rope)
        assert isinstance(attended, Tensor)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """A Llama-family causal language model; see the module docstring.

    >>> model = Llama(LlamaConfig(vocab_size=10, context_length=8, emb_dim=8, num_layers=1, num_heads=2,
    ...                           num_kv_heads=1, hidden_dim=16))
    >>> logits, _ = model(torch.tensor([[1, 2, 3], [4, 5, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    >>> logits.shape
    torch.Size([2, 3, 10])
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.rotary = Rotary(config.head_dim, config.context_length, config.rope_base, config.rope_factors)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.emb_dim, eps=config.norm_eps)
        self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight

    def make_kv_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One preallocated :class:`KVCache` per layer, ``max_len`` (default ``context_length``) positions."""
        length = self.config.context_length if max_len is None else max_len
        return [cast(LlamaBlock, block).attn.make_kv_cache(batch_size, length) for block in self.blocks]

    def forward(
        self,
        idx: Tensor,
        *,
        attention_mask: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Tensor, None]:
        """Logits ``(B, T, V)`` for token ids ``idx (B, T)``.

        Args:
            idx: token ids, continuing the cached ones when ``kv_caches`` is given.
            attention_mask: ``(B, S)``, ``True`` (or 1) = a real token, over the cached and the new tokens
                (``S = cached + T``); ``None``: all real.
            kv_caches: one :class:`KVCache` per layer, appended to.
            logits_to_keep: compute the logits of the last ``N`` positions only, ``(B, min(N, T), V)``; ``0``
                (the default) keeps every position, as transformers' argument of the same name. The output
                head is the largest product of a long input (SmolLM2 at 8192 tokens: 1.6 GB of float32
                logits), which an inspection of the attention or the next token alone does not need.

        Returns:
            ``(logits, None)`` (the second item is the loss slot of :class:`selfattention.GPT`'s interface,
            which :func:`selfattention.generate.generate` uses).

        Raises:
            ValueError: ids outside the vocabulary, a mask of the wrong shape, more tokens (cached plus
                new) than ``context_length``, or a negative ``logits_to_keep``.
        """
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 = every position), got {logits_to_keep!r}")
        if idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"idx must be integer (batch, tokens), got {idx.dtype} {tuple(idx.shape)}")
        batch, num_tokens = idx.shape
        start = kv_caches[0].length if kv_caches else 0
        if start + num_tokens > self.config.context_length:
            raise ValueError(
                f"{start + num_tokens} tokens ({start} cached + {num_tokens} new) exceed the model's "
                f"context_length={self.config.context_length}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        mask = None if attention_mask is None else attention_mask.to(device=idx.device, dtype=torch.bool)
        if mask is not None and tuple(mask.shape) != (batch, start + num_tokens):
            raise ValueError(
                f"attention_mask {tuple(mask.shape)} must be (batch, cached + new) = ({batch}, {start + num_tokens})"
            )
        rope = self.rotary.hook(_positions(mask, batch, start, num_tokens, idx.device))
        x = self.tok_emb(idx)  # (B, T) -> (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, kv_caches[layer] if kv_caches else None)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, T, C) -> (B, min(N, T), C)
        return self.out_head(self.final_norm(x)), None  # (B, T, C) -> (B, T, V)


def _positions(mask: Tensor | None, batch: int, start: int, num_tokens: int, device: torch.device) -> Tensor:
    """``(B, T)`` positions of the new tokens: the count of real tokens before each (0 for padding)."""
    if mask is None:
        return torch.arange(start, start + num_tokens, device=device).expand(batch, num_tokens)
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]  # (B, S) -> (B, T)
