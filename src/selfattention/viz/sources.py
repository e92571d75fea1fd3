"""Views to look at without a trained model: the worked example, and any text embedded the same way.

:func:`example_view` gives two layers:

* ``"W = I"``: the worked example's attention as the book first computes it (:func:`selfattention.walkthrough.walk`,
  as ``selfattention explain`` prints it): one head, the embeddings themselves as queries, keys and values
  (q = k = v = x), unscaled softmax. For "journey" the weights are 0.1385 ... 0.1581 and the context vector is
  [0.4419, 0.6515, 0.5683].
* ``"random W"``: ``num_heads`` heads of width 2 from random projections ``W^Q, W^K, W^V`` drawn as
  ``torch.rand(3, 2 * num_heads)`` in that order after ``torch.manual_seed(seed)``
  (:func:`selfattention.capture_projections`), scores scaled by ``1/sqrt(2)``, so that the head picker and the
  thumbnails have different heads to show.

Words of other text are embedded as the example does it where the word is one of the example's tokens
(case-insensitive), and otherwise by 3 numbers in [0, 1) drawn from a generator seeded with the word's
CRC-32, so the same word always gets the same vector. These are stand-ins for learned embeddings.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from selfattention import examples
from selfattention.inspect import capture, capture_projections
from selfattention.interventions import model_device
from selfattention.viz.html import AttentionView, HeadData, heads_from_record, piece_labels, view_from_capture
from selfattention.walkthrough import walk

if TYPE_CHECKING:
    from selfattention.pretrained import PretrainedEncoder

HEAD_WIDTH = 2


def embed_words(words: list[str]) -> Tensor:
    """``(T, 3)`` embeddings for ``words``: the example's vector for its tokens, a seeded draw for others."""
    known = {token.lower(): row for token, row in zip(examples.TOKENS, examples.EMBEDDINGS, strict=True)}
    rows = []
    for word in words:
        if word.lower() in known:
            rows.append(torch.tensor(known[word.lower()]))
        else:
            generator = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
            rows.append(torch.rand(3, generator=generator))
    return torch.stack(rows)  # (T, 3)


def example_view(
    text: str | None = None, *, num_heads: int = 4, causal: bool = False, seed: int = 123
) -> AttentionView:
    """The worked example (or ``text``, split on whitespace) as a two-layer :class:`AttentionView`.

    Args:
        text: words to look at; ``None`` for "Your journey starts with one step".
        num_heads: heads of the random-projection layer.
        causal: mask future tokens in both layers.
        seed: seed of the random projections.

    Raises:
        ValueError: for empty text or ``num_heads`` below 1.
    """
    words = list(examples.TOKENS) if text is None else text.split()
    if not words:
        raise ValueError("the text to view is empty; give at least one word")
    if num_heads < 1:
        raise ValueError(f"--heads must be at least 1, got {num_heads}")
    x = embed_words(words).float()  # (T, 3)
    steps = walk(words, x, scaled=False, causal=causal)
    identity = HeadData.from_tensors(
        steps.queries, steps.keys, steps.values, steps.scores, steps.weights, steps.context
    )
    record = capture_projections(x, HEAD_WIDTH * num_heads, seed=seed, num_heads=num_heads, causal=causal)
    return AttentionView(
        tokens=words,
        layers=[[identity], heads_from_record(record, len(words), name="random W")],
        causal=causal,
        layer_names=["W = I (q = k = v = x, unscaled)", f"random W, {num_heads} heads (scaled 1/√{HEAD_WIDTH})"],
        scales=[1.0, record.scale],
        title="Your journey starts with one step" if text is None else "Worked-example embeddings",
    )


def pretrained_view(model: PretrainedEncoder, text: str) -> AttentionView:
    """Every head of every layer of a pretrained encoder on ``text`` (its word pieces, ``[CLS]`` and ``[SEP]``).

    The text is run once while :func:`selfattention.capture` records the model's attention modules.

    Raises:
        ValueError: for empty text or text longer than the model reads (see ``PretrainedEncoder.tokenize``).
    """
    with capture(model.encoder) as cap:
        encoded = model.encode([text])
    tokens = encoded.batch.tokens(0)
    view = view_from_capture(cap, tokens, title=f"{model.name}: {text}")
    names = [f"layer {n} ({name})" for n, name in enumerate(view.layer_names)]
    return replace(view, layer_names=names)


def checkpoint_view(directory: str | Path, text: str, *, device: torch.device | str = "cpu") -> AttentionView:
    """Every head of every layer of a GPT trained by ``selfattention train``, on ``text``, causal mask shown;
    the model runs on ``device``.

    Tokens are the tokenizer's pieces, each decoded alone, labelled by :func:`~selfattention.viz.html.token_labels`
    (a space shows as ␣, a newline as ⏎, a tab as ⇥).

    Raises:
        ValueError: for a missing or damaged checkpoint, empty text, or text longer than the model's context.
    """
    from selfattention.training.recipe import load_gpt

    model, tokenizer = load_gpt(directory)
    if not text:
        raise ValueError("the text to view is empty")
    ids = tokenizer.encode(text)
    if len(ids) > model.config.context_length:
        raise ValueError(
            f"the text has {len(ids)} tokens, more than the model's context of {model.config.context_length}"
        )
    pieces = piece_labels(tokenizer.decode, ids)
    return _causal_view(model.to(device), ids, pieces, title=f"{Path(directory).name}: {text}")


def gguf_view(path: str, text: str, *, device: torch.device | str = "cpu") -> AttentionView:
    """Every head of every layer of a GGUF language model (``"smollm2"`` or a file) on ``text``, causal; the
    model runs on ``device``.

    Raises:
        ValueError: for a damaged file, empty text, or text longer than the model's context.
    """
    from selfattention.loaders.gguf import load_gguf, load_smollm2

    lm = load_smollm2() if path == "smollm2" else load_gguf(path)
    ids = lm.encode(text)
    if len(ids) > lm.context_length:
        raise ValueError(f"the text has {len(ids)} tokens, more than the model's context of {lm.context_length}")
    return _causal_view(lm.model.to(device), ids, piece_labels(lm.decode, ids), title=f"{lm.name}: {text}")


def _causal_view(model: torch.nn.Module, ids: list[int], pieces: list[str], *, title: str) -> AttentionView:
    """Run ``ids`` through ``model`` once while :func:`capture` records it; layers are named from 0."""
    with torch.no_grad(), capture(model) as cap:
        model(torch.tensor([ids], dtype=torch.long, device=model_device(model)))
    view = view_from_capture(cap, pieces, title=title)
    return replace(view, layer_names=[f"layer {n} ({name})" for n, name in enumerate(view.layer_names)])


def model_view(
    model: str,
    text: str | None = None,
    *,
    num_heads: int = 4,
    causal: bool = False,
    seed: int = 123,
    device: torch.device | str = "cpu",
) -> AttentionView:
    """The view for ``selfattention view --model MODEL``: ``"example"``, ``"minilm"``, ``"smollm2"``, a ``.gguf``
    file or a checkpoint folder.

    ``num_heads``, ``causal`` and ``seed`` apply to the example only; the pretrained encoder and a trained GPT
    read ``text`` (default: the worked example's sentence). ``device``: where a model runs (the example's
    few numbers are computed on the CPU).

    Raises:
        ValueError: for a model that is none of these. ImportError: for a model whose packages are not
            installed (the message says what to install).
    """
    if model == "example":
        return example_view(text, num_heads=num_heads, causal=causal, seed=seed)
    text = " ".join(examples.TOKENS) if text is None else text
    if model == "minilm":
        from selfattention.pretrained import load_minilm

        return pretrained_view(load_minilm().to(device), text)
    if Path(model).is_dir():
        return checkpoint_view(model, text, device=device)
    if model == "smollm2" or model.endswith(".gguf"):
        return gguf_view(model, text, device=device)
    raise ValueError(
        f"--model {model!r} is not 'example', 'minilm', 'smollm2', a .gguf file or an existing checkpoint folder"
    )
