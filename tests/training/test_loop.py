"""The training loop on a model that is not a transformer: the loop knows nothing about GPT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from selfattention.training.loop import TrainConfig, Trainer, learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")


class Bigram(nn.Module):
    """Next token from the current one only: a lookup table of logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.table(idx)
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def cyclic_batches(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences counting 0, 1, ..., 7, 0, ... from a random start: the next token is always known."""
    starts = torch.randint(8, (4, 1), generator=generator)
    seq = (starts + torch.arange(9)) % 8
    return seq[:, :-1], seq[:, 1:]


def make_trainer(steps: int = 60, **kwargs) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(
        max_steps=steps,
        batch_size=4,
        learning_rate=0.1,
        min_learning_rate=0.01,
        warmup_steps=5,
        eval_interval=20,
        eval_batches=2,
    )
    return Trainer(Bigram(8), config, cyclic_batches, cyclic_batches, progress=False, **kwargs)


def test_schedule_warms_up_then_decays_to_the_minimum() -> None:
    config = TrainConfig(max_steps=100, learning_rate=1.0, min_learning_rate=0.1, warmup_steps=10)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(55, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(100, config) == pytest.approx(0.1)


def test_loss_falls_and_is_validated() -> None:
    trainer = make_trainer()
    history = trainer.run()
    assert [s for s, _ in history.val] == [20, 40, 60]
    assert len(history.train) == 60
    assert history.train[-1][1] < 0.25 * history.train[0][1]
    assert history.val[-1][1] < history.val[0][1]


def test_state_restores_an_identical_continuation() -> None:
    whole = make_trainer()
    whole.run()
    first = make_trainer()
    first.run(until=25)
    tensors, state = first.state_tensors(), first.state_json()
    second = make_trainer()
    second.model.load_state_dict(first.model.state_dict())  # weights travel apart from the trainer state
    second.load_state(tensors, state)
    second.run()
    assert second.history.train == whole.history.train  # exactly: same data, same optimizer moments
    assert second.history.val == whole.history.val


def test_interrupt_saves_then_propagates() -> None:
    saved: list[int] = []

    def interrupt(trainer: Trainer) -> None:
        if trainer.step == 7:
            raise KeyboardInterrupt

    trainer = make_trainer(checkpoint=lambda t: saved.append(t.step), on_step=interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert saved == [7]


def test_bad_config_is_named() -> None:
    with pytest.raises(ValueError, match="max_steps must be at least 1, got 0"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match=r"min_learning_rate \(0.5\) <= learning_rate \(0.1\)"):
        TrainConfig(learning_rate=0.1, min_learning_rate=0.5)


def test_state_of_another_model_is_refused_before_use() -> None:
    """Optimizer moments of a wider model (or another number of parameters) would crash the first step."""
    source = make_trainer()
    source.run(until=3)
    tensors, state = source.state_tensors(), source.state_json()
    wider = Trainer(Bigram(9), source.config, cyclic_batches, progress=False)
    with pytest.raises(ValueError, match=r"optimizer.0.exp_avg has shape \(8, 8\), this model's parameter 0 needs"):
        wider.load_state(tensors, state)
    assert wider.step == 0 and not wider.optimizer.state  # nothing was changed
    extra = {**tensors, "optimizer.1.exp_avg": torch.zeros(8, 8)}
    with pytest.raises(ValueError, match=r"optimizer.1.exp_avg is for parameter 1; this model has 1"):
        make_trainer().load_state(extra, state)
    without = {k: v for k, v in tensors.items() if k != "rng.data"}
    with pytest.raises(ValueError, match=r"lacks the random generator state 'rng.data'"):
        make_trainer().load_state(without, state)
