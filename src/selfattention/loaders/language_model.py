"""A causal language model together with its tokenizer and chat template: what :func:`load_gguf` returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfattention.generate import generate
from selfattention.interventions import model_device
from selfattention.models.llama import Llama
from selfattention.viz.html import piece_labels


@dataclass(frozen=True)
class PaddedBatch:
    """Token ids of several texts, right-padded.

    Attributes:
        input_ids: ``(B, T)`` ids, padding filled with the pad id.
        attention_mask: ``(B, T)`` boolean, ``True`` = a real token.
    """

    input_ids: Tensor
    attention_mask: Tensor


class LanguageModel:
    """A :class:`Llama` in evaluation mode with its ``tokenizers.Tokenizer`` and the file's metadata.

    Attributes:
        model: the network (``model.blocks[i].attn`` are our :class:`MultiHeadAttention` modules).
        tokenizer: built from the file's vocabulary and merges.
        metadata: every metadata key of the file (``tokenizer.chat_template``, special token ids...).
        name: what messages call the model.
    """

    def __init__(self, model: Llama, tokenizer: Any, metadata: Mapping[str, Any], *, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.metadata = dict(metadata)
        self.name = name

    @property
    def context_length(self) -> int:
        """The most tokens (prompt and output) the model reads."""
        return self.model.config.context_length

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence token, where decoding stops."""
        value = self.metadata.get("tokenizer.ggml.eos_token_id")
        return None if value is None else int(value)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file, if any."""
        return self.metadata.get("tokenizer.chat_template")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in it, like ``<|im_start|>``, are kept whole).

        Raises:
            ValueError: an empty text. TypeError: not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"the text must be a string, got {type(text).__name__}")
        ids = list(self.tokenizer.encode(text).ids)
        if not ids:
            raise ValueError("the prompt is empty; give at least one character")
        return ids

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = False) -> str:
        """The text of token ids."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return str(self.tokenizer.decode(values, skip_special_tokens=skip_special_tokens))

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """Readable token strings: GPT-2's byte alphabet turned back into text, labelled as on every page
        (:func:`selfattention.viz.html.token_labels`: ␣ ⏎ ⇥ for space, newline and tab, ∅ for nothing)."""
        return piece_labels(self.decode, ids)

    def chat_prompt(self, message: str) -> str:
        """``message`` as one user turn in the file's chat template, ready for the assistant's answer.

        Raises:
            ValueError: the file has no chat template.
        """
        template = self.chat_template
        if not template:
            raise ValueError(f"{self.name} has no chat template (no tokenizer.chat_template in the file)")
        import jinja2

        environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        bos = self.metadata.get("tokenizer.ggml.bos_token_id")
        tokens = self.metadata.get("tokenizer.ggml.tokens") or []
        return environment.from_string(template).render(
            messages=[{"role": "user", "content": message}],
            add_generation_prompt=True,
            bos_token=tokens[bos] if bos is not None else "",
        )

    def pad(self, texts: Sequence[str]) -> PaddedBatch:
        """Tokenize ``texts`` into one right-padded batch.

        Raises:
            ValueError: no texts, an empty text, or one longer than the context.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError(f"give a list of one or more texts, got {texts!r}")
        rows = [self.encode(text) for text in texts]
        for index, row in enumerate(rows, start=1):
            if len(row) > self.context_length:
                raise ValueError(f"text {index} has {len(row)} tokens, more than the context of {self.context_length}")
        pad_id = int(self.metadata.get("tokenizer.ggml.padding_token_id", self.eos_token_id or 0))
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = True
        return PaddedBatch(ids, mask)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        use_cache: bool = True,
        on_token: Callable[[Tensor], None] | None = None,
    ) -> list[int]:
        """Continue ``prompt``; returns the new token ids (stopping early after the end-of-sequence token).

        The model runs where its weights are (``lm.model.to("cuda")`` moves it); ``seed`` seeds a generator
        on the CPU, which draws the samples for a model on any device.

        Raises:
            ValueError: an empty prompt, or prompt plus ``max_new_tokens`` beyond the context.
        """
        ids = torch.tensor([self.encode(prompt)], dtype=torch.long, device=model_device(self.model))
        out = generate(
            self.model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=torch.Generator().manual_seed(seed),
            use_cache=use_cache,
            eos_token_id=self.eos_token_id,
            on_token=on_token,
        )
        return [int(i) for i in out[0, ids.shape[1] :]]
