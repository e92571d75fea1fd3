"""A training loop that knows nothing about the model it trains.

The model is any ``nn.Module`` called as ``model(inputs, targets) -> (outputs, loss)``; batches come from a
function of a :class:`torch.Generator`. The loop does AdamW with linear warmup and cosine decay, gradient
clipping, periodic validation, a progress bar with the loss and tokens/s, and hands its state to a
``checkpoint`` callback (at every validation, at the end, and on Ctrl-C before the interrupt propagates).

Everything a resumed run needs to continue exactly (same losses as without the interruption) is in
:meth:`Trainer.state_tensors` and :meth:`Trainer.state_json`: optimizer moments, the generator that orders
the data, PyTorch's global RNG (dropout), the step and the loss history.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from selfattention.training.ddp import step_seed

Batch = tuple[Tensor, Tensor]
BatchFn = Callable[[torch.Generator], Batch]


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is per process (a data-parallel run multiplies it)."""

    max_steps: int = 2000
    batch_size: int = 12
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    seed: int = 1337

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value, by name."""
        return {entry.name: entry.default for entry in fields(cls)}

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "min_learning_rate", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                f"need 0 <= min_learning_rate ({self.min_learning_rate}) <= learning_rate ({self.learning_rate})"
            )


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_learning_rate`` at ``max_steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_learning_rate + cosine * (config.learning_rate - config.min_learning_rate)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norm gains), as is usual for transformers."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2))


@dataclass
class History:
    """Losses so far: ``(step, loss)`` pairs, training every step, validation every ``eval_interval``."""

    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)


class Trainer:
    """Runs :class:`TrainConfig` on ``model`` with batches from ``train_batch`` (and ``val_batch``).

    Args:
        model: called as ``model(inputs, targets) -> (outputs, loss)``; may be wrapped in
            ``DistributedDataParallel`` (``.module`` is then used for validation).
        config: the optimisation settings.
        train_batch, val_batch: functions of a generator returning ``(inputs, targets)``.
        checkpoint: called with the trainer at each validation, at the end and on Ctrl-C.
        on_step: called with the trainer after every step (progress hooks, tests).
        rank, world_size: this process in a data-parallel run; only rank 0 validates, shows progress and
            calls ``checkpoint``. With ``world_size > 1`` each step first seeds the global random generator
            (dropout) from the seed, the rank and the step (:func:`~selfattention.training.ddp.step_seed`):
            each rank drops its own units, and a resumed run drops the ones an uninterrupted run would.
        progress: show a progress bar (on rank 0).
        log: print each validation loss (on rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batch: BatchFn,
        val_batch: BatchFn | None = None,
        *,
        checkpoint: Callable[[Trainer], None] | None = None,
        on_step: Callable[[Trainer], None] | None = None,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
        log: bool = True,
    ) -> None:
        self.model, self.config = model, config
        self.train_batch, self.val_batch = train_batch, val_batch
        self.checkpoint_fn, self.on_step = checkpoint, on_step
        self.rank, self.world_size = rank, world_size
        self.show_progress = progress and rank == 0
        self.log = log and rank == 0
        self.optimizer = make_optimizer(model, config)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history = History()
        self.tokens_per_second = 0.0
        self.stopping = False  # set when a Ctrl-C is being handled, for the checkpoint callback

    @property
    def raw_model(self) -> nn.Module:
        """The model without a data-parallel wrapper."""
        module = getattr(self.model, "module", None)
        return module if isinstance(module, nn.Module) else self.model

    def run(self, until: int | None = None) -> History:
        """Train from the current step to ``until`` (default ``max_steps``); returns the loss history.

        Ctrl-C finishes the current step, calls ``checkpoint`` and raises ``KeyboardInterrupt``; a second
        Ctrl-C stops at once without saving (a save it interrupts is abandoned whole: the previous
        checkpoint stays in use, see :mod:`selfattention.training.checkpoint`). A ``KeyboardInterrupt``
        raised by ``on_step`` also saves first.
        """
        stop = self.config.max_steps if until is None else min(until, self.config.max_steps)
        bar = self._progress_bar(stop)
        try:
            with _deferred_interrupt() as interrupted:
                while self.step < stop:
                    loss = self.train_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_second:,.0f}")
                    if self.step % self.config.eval_interval == 0 or self.step == self.config.max_steps:
                        self.validate()
                        self.save()
                    if self.on_step is not None:
                        self.on_step(self)
                    if self._any_rank(interrupted()):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.stopping = True
            if not _HardInterrupt.raised:
                self.save()
            raise
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` on any rank (so that every rank stops after the same step)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def train_step(self) -> float:
        """One optimisation step on one batch; returns its loss (averaged over ranks)."""
        start = time.perf_counter()
        self.model.train()
        inputs, targets = self.train_batch(self.data_generator)
        rate = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        if self.world_size > 1:
            torch.manual_seed(step_seed(self.config.seed, self.rank, self.step))
        try:
            _, loss = self.model(inputs, targets)
        except ValueError as error:  # the attention's checks refuse non-finite or overflowing activations
            if self.step == 0:
                raise
            raise ValueError(f"training diverged at step {self.step + 1} (learning rate {rate:.3g}): {error}") from None
        if not torch.isfinite(loss.detach()):
            raise ValueError(
                f"training diverged at step {self.step + 1}: the loss is {float(loss)} (learning rate {rate:.3g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        value = loss.detach()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value = value / self.world_size
        self.step += 1
        self.history.train.append((self.step, float(value)))
        speed = inputs.numel() * self.world_size / max(time.perf_counter() - start, 1e-9)
        previous = self.tokens_per_second  # shown smoothed: the mean of roughly the last 10 steps
        self.tokens_per_second = speed if previous == 0 else 0.9 * previous + 0.1 * speed
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over ``eval_batches`` validation batches, the same batches every time; rank 0 only."""
        if self.val_batch is None or self.rank != 0:
            return None
        model = self.raw_model
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed((self.config.seed + 1) % 2**64)  # --seed takes up to 2**64 - 1
        losses = [float(model(*self.val_batch(generator))[1]) for _ in range(self.config.eval_batches)]
        model.train(was_training)
        return sum(losses) / len(losses)

    def validate(self) -> None:
        """Record the validation loss at this step and report it."""
        val = self.evaluate()
        if val is None:
            return
        self.history.val.append((self.step, val))
        if self.log:
            from tqdm import tqdm

            train = self.history.train[-1][1]
            tqdm.write(f"step {self.step}: train loss {train:.4f}, val loss {val:.4f}")

    def save(self) -> None:
        """Hand the state to the ``checkpoint`` callback (rank 0 only)."""
        if self.checkpoint_fn is not None and self.rank == 0:
            self.checkpoint_fn(self)

    def _progress_bar(self, stop: int) -> Any:
        if not self.show_progress or self.step >= stop:
            return None
        from tqdm import tqdm

        return tqdm(total=stop, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    # State for exact resumption -------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        """Optimizer moments and RNG states as named tensors (for a safetensors file)."""
        tensors: dict[str, Tensor] = {
            "rng.data": self.data_generator.get_state(),
            "rng.torch": torch.get_rng_state(),
        }
        for index, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).clone()
        return tensors

    def state_json(self) -> dict[str, Any]:
        """The step, loss history, optimizer groups and config as JSON-ready values."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        return {
            "step": self.step,
            "config": asdict(self.config),
            "history": {"train": self.history.train, "val": self.history.val},
            "optimizer_groups": json.loads(json.dumps(groups)),
        }

    def load_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` and :meth:`state_json` saved, after checking it fits this model.

        Raises:
            ValueError: when the saved optimizer does not match this model's parameters (another width,
                another number of layers), or the saved state is incomplete or malformed.
        """
        current = self.optimizer.state_dict()
        saved_groups = state.get("optimizer_groups")
        if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups):
            raise ValueError(f"saved optimizer_groups must be a list of objects, got {str(saved_groups)[:40]}")
        if len(saved_groups) != len(current["param_groups"]):
            raise ValueError(
                f"saved optimizer has {len(saved_groups)} parameter groups, expected {len(current['param_groups'])}"
            )
        groups = []
        for group, saved in zip(current["param_groups"], saved_groups, strict=True):
            if not isinstance(saved.get("betas"), list) or len(saved["betas"]) != 2:
                raise ValueError(f"saved optimizer group lacks its two betas: {str(saved)[:80]}")
            groups.append({**saved, "params": group["params"], "betas": tuple(saved["betas"])})
        opt_state = self._optimizer_tensors(tensors)
        step, history = state.get("step"), state.get("history")
        try:
            train = [(int(s), float(v)) for s, v in history["train"]]  # type: ignore[index]
            val = [(int(s), float(v)) for s, v in history["val"]]  # type: ignore[index]
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.config.max_steps:
                raise ValueError(f"step must be an integer in [0, max_steps={self.config.max_steps}]")
        except (TypeError, ValueError, KeyError, OverflowError) as error:
            raise ValueError(f"saved trainer state is malformed: {error} (step {str(step)[:40]})") from None
        for key in ("rng.data", "rng.torch"):
            if key not in tensors or tensors[key].dtype != torch.uint8:
                raise ValueError(f"saved trainer state lacks the random generator state {key!r}")
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.data_generator.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = step
        self.history = History(train=train, val=val)

    def _optimizer_tensors(self, tensors: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """The saved AdamW moments by parameter index, each checked against its parameter's shape."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        opt_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if not key.startswith("optimizer."):
                continue
            _, index, name = key.split(".", 2)
            if not index.isdigit() or int(index) >= len(params):
                raise ValueError(f"saved optimizer tensor {key} is for parameter {index}; this model has {len(params)}")
            expected = () if name == "step" else tuple(params[int(index)].shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"saved optimizer tensor {key} has shape {tuple(value.shape)}, this model's parameter "
                    f"{index} needs {expected}: the trainer state is from another model"
                )
            opt_state.setdefault(int(index), {})[name] = value
        if opt_state and len(opt_state) != len(params):
            raise ValueError(
                f"saved optimizer holds moments for {len(opt_state)} parameters; this model has {len(params)}"
            )
        return opt_state


class _HardInterrupt:
    """Whether the last interrupt was a second Ctrl-C (the state may then be mid-step: not saved)."""

    raised = False


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first SIGINT into a flag (read through the yielded function); the second one interrupts."""
    _HardInterrupt.raised = False
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = [False]

    def handler(signum: int, frame: object) -> None:
        if pressed[0]:
            _HardInterrupt.raised = True
            raise KeyboardInterrupt
        pressed[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: pressed[0]
    finally:
        signal.signal(signal.SIGINT, previous)
