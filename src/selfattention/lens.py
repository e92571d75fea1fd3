"""The logit lens (nostalgebraist, 2020): read every layer's residual stream as if it were the last.

For a causal language model, ``logits_l = out_head(final_norm(x_l))`` where ``x_l (B, T, C)`` is the residual
stream after block ``l``. At the last block this is exactly the model's own output; at earlier blocks it shows
which next token the stream already points to, and from which layer on the final answer leads.

>>> from selfattention import GPT, GPTConfig
>>> model = GPT(GPTConfig(vocab_size=20, context_length=8, emb_dim=16, num_layers=2, num_heads=2)).eval()
>>> ids = torch.tensor([[1, 2, 3]])
>>> lens = logit_lens(model, ids)
>>> lens.shape, torch.equal(lens[-1], model(ids)[0])
(torch.Size([2, 1, 3, 20]), True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selfattention.interventions import causal_blocks


@torch.no_grad()
def logit_lens(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token logits read from the residual stream after each block: ``(L, B, T, V)``.

    Args:
        model: a causal language model with ``blocks``, ``final_norm`` and ``out_head`` (a GPT or a Llama).
        ids: token ids ``(B, T)``.

    Raises:
        TypeError: another kind of model.
    """
    blocks = causal_blocks(model)
    streams: list[Tensor] = []
    handles = [block.register_forward_hook(lambda _, __, out: streams.append(out)) for block in blocks]
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    norm: Any = model.final_norm
    head: Any = model.out_head
    return torch.stack([head(norm(x)) for x in streams])  # L x (B, T, V)


def top_predictions(logits: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """The ``k`` most likely next tokens: ``(probabilities, ids)``, each ``(..., k)``, from logits ``(..., V)``.

    Raises:
        ValueError: ``k`` outside ``1 .. V``.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k ({k}) must be between 1 and the vocabulary size {logits.shape[-1]}")
    return logits.float().softmax(dim=-1).topk(k, dim=-1)
