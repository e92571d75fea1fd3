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

__all__ = [
    "BACKENDS",
    "attention",
    "attention_scores",
    "attention_weights",
    "causal_mask",
    "context_vectors",
    "masks",
]
__version__ = "0.1.0"
