"""selfattention: self-attention from first principles to fast, tested kernels."""

from selfattention import masks
from selfattention.backends import BACKENDS
from selfattention.functional import (
    attention,
    attention_scores,
    attention_weights,
    causal_mask,
    context_vectors,
)
from selfattention.inspect import Capture, Record, TopKeys, capture, capture_projections, capture_top_k
from selfattention.models.gpt import GPT, GPTConfig
from selfattention.modules import (
    CausalAttention,
    KVCache,
    MultiHeadAttention,
    SelfAttention,
    SelfAttentionV1,
)

__all__ = [
    "BACKENDS",
    "GPT",
    "Capture",
    "CausalAttention",
    "GPTConfig",
    "KVCache",
    "MultiHeadAttention",
    "Record",
    "SelfAttention",
    "SelfAttentionV1",
    "TopKeys",
    "attention",
    "attention_scores",
    "attention_weights",
    "capture",
    "capture_projections",
    "capture_top_k",
    "causal_mask",
    "context_vectors",
    "masks",
]
__version__ = "0.1.0"
