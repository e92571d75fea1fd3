"""Ablation and activation patching: run a model with chosen heads' outputs zeroed, averaged or copied in.

A head's output here is its context ``z (B, T, E)``, the slice of the input of the attention module's output
projection ``out_proj`` that belongs to it (``out_proj`` mixes the heads, so the slice is exactly what one
head contributes). Every edit is a forward pre-hook on ``out_proj`` of the layers it touches: the attention
itself keeps its fast path (the fused kernel), and modules without an edit run as usual.

- **zero ablation**: the head's ``z`` is replaced by zeros; **mean ablation**: by its mean over the batch and
  positions of a reference run (:func:`head_means`).
- **activation patching** (head): the head's ``z`` in a *corrupted* run is replaced by its value in a *clean*
  run; the change of a metric says how much that head carries the difference between the runs.
- **residual patching**: the residual stream entering block ``l`` at one position is replaced by the clean
  run's (:func:`patch_residual`); at layer 0 and every position this reproduces the clean run exactly.

The models are those whose attention modules are :class:`selfattention.modules.MultiHeadAttention`; the
metric functions need a causal language model (:class:`selfattention.GPT`,
:class:`selfattention.models.llama.Llama`: ``blocks``, ``final_norm`` and ``out_head``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfattention.modules import MultiHeadAttention

HeadEdit = Callable[[Tensor], Tensor]
"""Rewrites the per-head context ``(B, T, H, E)`` entering ``out_proj`` and returns it."""


def attention_modules(model: nn.Module) -> list[tuple[str, MultiHeadAttention]]:
    """``(name, module)`` of every :class:`MultiHeadAttention` in ``model``, in model order (layer 0 first).

    Raises:
        TypeError: a model with none.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    if not found:
        raise TypeError(f"{type(model).__name__} has no MultiHeadAttention module to edit")
    return found


def causal_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``blocks`` of a causal language model (one with ``blocks``, ``final_norm`` and ``out_head``).

    Raises:
        TypeError: another kind of model, naming its type.
    """
    if not all(hasattr(model, part) for part in ("blocks", "final_norm", "out_head")):
        raise TypeError(
            f"{type(model).__name__} is not a causal language model with blocks, final_norm and out_head "
            "(a GPT or a Llama)"
        )
    blocks = model.blocks
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any): where its inputs must be made."""
    return next(model.parameters(), torch.empty(0)).device


def model_logits(model: nn.Module, ids: Tensor) -> Tensor | None:
    """Run ``model`` on ``ids (B, T)``; its next-token logits ``(B, T, V)``, or ``None`` for an encoder."""
    out = model(ids)
    if not hasattr(model, "out_head"):
        return None
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def edit_heads(model: nn.Module, edits: dict[int, HeadEdit]) -> Iterator[None]:
    """Apply ``edits[layer]`` to the per-head context entering ``out_proj`` of those layers while inside.

    Args:
        model: a model with :class:`MultiHeadAttention` modules, numbered in model order from 0.
        edits: ``{layer: edit}``, each edit taking and returning ``z (B, T, H, E)``.

    Raises:
        ValueError: a layer out of range.
    """
    modules = attention_modules(model)
    for layer in edits:
        if not 0 <= layer < len(modules):
            raise ValueError(f"layer {layer} out of range: the model has layers 0-{len(modules) - 1}")
    handles = []
    try:
        for layer, edit in edits.items():
            module = modules[layer][1]
            handles.append(module.out_proj.register_forward_pre_hook(_pre_hook(module.num_heads, edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(num_heads: int, edit: HeadEdit) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Tensor]]:
    def hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor]:
        merged = args[0]
        batch, num_tokens, width = merged.shape
        per_head = merged.reshape(
            batch, num_tokens, num_heads, width // num_heads
        ).clone()  # (B, T, H*E) -> (B, T, H, E)
        return (edit(per_head).reshape(batch, num_tokens, width),)

    return hook


def check_heads(model: nn.Module, heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` of ``(layer, head)`` pairs, checked against the model.

    Raises:
        ValueError: a layer or head out of range, naming the model's range.
    """
    modules = attention_modules(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not 0 <= layer < len(modules):
            raise ValueError(f"layer {layer} out of range: the model has layers 0-{len(modules) - 1}")
        num_heads = modules[layer][1].num_heads
        if not 0 <= head < num_heads:
            raise ValueError(f"head {head} out of range: layer {layer} has heads 0-{num_heads - 1}")
        by_layer.setdefault(layer, []).append(head)
    return by_layer


@contextmanager
def ablate_heads(
    model: nn.Module, heads: Sequence[tuple[int, int]], *, means: Sequence[Tensor] | None = None
) -> Iterator[None]:
    """Run ``model`` with the output of each ``(layer, head)`` in ``heads`` zeroed (or set to its mean).

    Args:
        heads: ``(layer, head)`` pairs, counted from 0.
        means: from :func:`head_means`: one ``(H, E)`` per layer; given, the heads are mean-ablated.

    Raises:
        ValueError: a layer or head out of range.
    """
    with replace_heads(model, heads, lambda layer, chosen: 0.0 if means is None else means[layer][chosen]):
        yield


@contextmanager
def replace_heads(
    model: nn.Module, heads: Sequence[tuple[int, int]], value: Callable[[int, list[int]], Tensor | float]
) -> Iterator[None]:
    """Run ``model`` with the outputs of ``heads`` set to ``value(layer, chosen)``, the replacement of
    ``z[:, :, chosen]`` (``(B, T, h, E)`` or anything that broadcasts to it) for the heads ``chosen`` of a layer.

    Raises:
        ValueError: a layer or head out of range.
    """
    edits: dict[int, HeadEdit] = {}
    for layer, chosen in check_heads(model, heads).items():
        replacement = value(layer, chosen)

        def edit(z: Tensor, chosen: list[int] = chosen, new: Tensor | float = replacement) -> Tensor:
            z[:, :, chosen] = new.to(z) if isinstance(new, Tensor) else new  # z's dtype and device
            return z

        edits[layer] = edit
    with edit_heads(model, edits):
        yield


@torch.no_grad()
def head_outputs(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """Every head's output on ``ids (B, T)``: one ``z (B, T, H, E)`` per layer (the input of ``out_proj``)."""
    outputs: list[Tensor] = []

    def keep(z: Tensor) -> Tensor:
        outputs.append(z.clone())
        return z

    with edit_heads(model, dict.fromkeys(range(len(attention_modules(model))), keep)):
        model(ids)
    return outputs


def head_means(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """Each head's mean output over the batch and positions of ``ids``: one ``(H, E)`` per layer."""
    return [z.mean(dim=(0, 1)) for z in head_outputs(model, ids)]


@contextmanager
def patch_heads(model: nn.Module, heads: Sequence[tuple[int, int]], source: Sequence[Tensor]) -> Iterator[None]:
    """Run ``model`` with the output of each ``(layer, head)`` replaced by its value in ``source``.

    Args:
        heads: ``(layer, head)`` pairs, counted from 0.
        source: :func:`head_outputs` of the clean run, ``(B, T, H, E)`` per layer, with the batch and length
            of the runs to patch (or a batch of 1, shared).

    Raises:
        ValueError: a layer or head out of range.
    """
    with replace_heads(model, heads, lambda layer, chosen: source[layer][:, :, chosen]):
        yield


@torch.no_grad()
def residual_inputs(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """The residual stream entering each block of a causal language model on ``ids``: ``(B, T, C)`` per layer."""
    inputs: list[Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda _, args: inputs.append(args[0].clone()))
        for block in causal_blocks(model)
    ]
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


@contextmanager
def patch_residual(model: nn.Module, layer: int, source: Tensor, positions: Tensor | None = None) -> Iterator[None]:
    """Run ``model`` with the residual stream entering block ``layer`` replaced by ``source`` at ``positions``.

    Args:
        source: the clean run's stream entering that block, ``(B, T, C)`` (from :func:`residual_inputs`).
        positions: ``(B,)`` one position per row of the batch (row ``b`` patches position ``positions[b]``);
            ``None``: every position.

    Raises:
        ValueError: a layer out of range.
    """
    blocks = causal_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range: the model has layers 0-{len(blocks) - 1}")

    def hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        if positions is None:
            x[:] = source.to(x.dtype)
        else:
            rows, at = torch.arange(x.shape[0], device=x.device), positions.to(x.device)
            x[rows, at] = source.expand_as(x)[rows, at].to(x.dtype)
        return (x, *args[1:])

    handle = blocks[layer].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def logit_difference(logits: Tensor, answer: int, wrong: int) -> Tensor:
    """``logit[answer] - logit[wrong]`` at the last position of each row: ``(B, T, V) -> (B,)``."""
    return (logits[:, -1, answer] - logits[:, -1, wrong]).float()


NEGLIGIBLE_GAP = 1e-4
"""A gap between the clean and corrupted differences no larger than this fraction of their size (or of 1)
is taken as none: float32 logits carry relative errors near 1e-6."""


@dataclass(frozen=True)
class PatchingResult:
    """The logit difference of two answers in the clean and corrupted runs, and what patching restores.

    Attributes:
        clean, corrupted: ``logit[answer] - logit[wrong]`` at the last position of each run.
        heads: ``(L, H)``, the change of the corrupted run's difference when one head is patched from the
            clean run. residual: ``(L, T)``, the same for the residual stream entering block ``l`` at
            position ``t``.
    """

    clean: float
    corrupted: float
    heads: Tensor
    residual: Tensor

    def restored(self, effects: Tensor) -> Tensor:
        """``effects`` as the fraction of the gap ``clean - corrupted`` (1: the clean run's difference).

        Raises:
            ValueError: a gap within :data:`NEGLIGIBLE_GAP` of the differences' size, where the fractions
                would be float32 rounding divided by almost nothing (a gap of 5e-7 gave "+1071.000").
        """
        gap = self.clean - self.corrupted
        if abs(gap) <= NEGLIGIBLE_GAP * max(1.0, abs(self.clean), abs(self.corrupted)):
            raise ValueError(
                f"the clean and corrupted runs give the same logit difference ({self.clean:+.4g} and "
                f"{self.corrupted:+.4g}, a gap of {gap:.2g}): nothing to restore"
            )
        return effects / gap


@torch.no_grad()
def patching_effects(
    model: nn.Module,
    clean: Tensor,
    corrupted: Tensor,
    answer: int,
    wrong: int,
    *,
    residual: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> PatchingResult:
    """Patch every head (and every layer's residual stream at every position) from ``clean`` into ``corrupted``.

    One forward pass per layer does all its heads at once: row ``h`` of a batch of ``H`` copies of the
    corrupted prompt has head ``h`` patched (and row ``t`` of a batch of ``T`` copies, position ``t``).
    The unpatched baseline is computed on the same batch shape, so patching a run with itself gives 0.

    Args:
        model: a causal language model (:func:`causal_blocks`).
        clean, corrupted: ``(1, T)`` token ids of the same length, on the model's device.
        answer, wrong: the token ids whose logit difference is the metric.
        residual: also patch the residual stream. progress: called with ``(done, total)`` forward passes.

    Raises:
        ValueError: prompts of different shapes, or ids outside the vocabulary.
        TypeError: a model that is not a causal language model.
    """
    blocks = causal_blocks(model)
    if clean.dim() != 2 or clean.shape[0] != 1 or clean.shape != corrupted.shape:
        raise ValueError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must both be (1, T) with the same T"
        )
    config: Any = model.config
    vocab = int(config.vocab_size)
    for name, token in (("answer", answer), ("wrong", wrong)):
        if not 0 <= token < vocab:
            raise ValueError(f"{name} token {token} is outside the vocabulary 0-{vocab - 1}")
    num_layers, num_heads, num_tokens = len(blocks), attention_modules(model)[0][1].num_heads, clean.shape[1]
    total = num_layers * (2 if residual else 1)

    def metric(ids: Tensor) -> Tensor:
        logits = model_logits(model, ids)
        assert logits is not None
        return logit_difference(logits, answer, wrong)

    clean_diff, corrupted_diff = float(metric(clean)[0]), float(metric(corrupted)[0])
    source = head_outputs(model, clean)
    batch = corrupted.expand(num_heads, -1)
    baseline = metric(batch)
    heads = torch.zeros(num_layers, num_heads)  # the results stay on the CPU, wherever the model runs
    for layer in range(num_layers):

        def edit(z: Tensor, clean_z: Tensor = source[layer]) -> Tensor:
            rows = torch.arange(z.shape[0], device=z.device)
            z[rows, :, rows] = clean_z[0].transpose(0, 1).to(z.dtype)  # row h gets head h: (T, H, E) -> (H, T, E)
            return z

        with edit_heads(model, {layer: edit}):
            heads[layer] = (metric(batch) - baseline).cpu()
        if progress is not None:
            progress(layer + 1, total)
    effects = torch.zeros(num_layers, num_tokens)
    if residual:
        streams = residual_inputs(model, clean)
        batch = corrupted.expand(num_tokens, -1)
        baseline = metric(batch)
        for layer in range(num_layers):
            positions = torch.arange(num_tokens, device=corrupted.device)
            with patch_residual(model, layer, streams[layer], positions=positions):
                effects[layer] = (metric(batch) - baseline).cpu()
            if progress is not None:
                progress(num_layers + layer + 1, total)
    return PatchingResult(clean=clean_diff, corrupted=corrupted_diff, heads=heads, residual=effects)
