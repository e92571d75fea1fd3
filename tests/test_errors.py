"""Bad input to the library: one clear error naming the values, never a silent wrong answer."""

from __future__ import annotations

import pytest
import torch

from selfattention import attention, attention_scores, attention_weights

x = torch.randn(2, 4, 8)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: attention(x, torch.randn(2, 4, 7), x),
            ValueError,
            r"query width \(8\) must equal key width \(7\)",
        ),
        (lambda: attention_scores(torch.ones(3, 2), torch.ones(3, 5)), ValueError, r"query width \(2\)"),
        (
            lambda: attention(x, x, torch.randn(2, 5, 8)),
            ValueError,
            "key and value must have the same length",
        ),
        (
            lambda: attention(x, x, x, mask=torch.ones(4, 5, dtype=torch.bool)),
            ValueError,
            r"mask of shape \(4, 5\)",
        ),
        (
            lambda: attention(x, x, x, mask=torch.ones(4, 4, dtype=torch.int64)),
            TypeError,
            "dtype torch.int64",
        ),
        (
            lambda: attention_weights(torch.ones(4, 4), mask=torch.ones(4, 4, dtype=torch.int32)),
            TypeError,
            "int32",
        ),
        (lambda: attention(x, x, x, backend="fast"), ValueError, r"unknown backend 'fast'; choose one of"),
        (
            lambda: attention(x, x, x, backend="sdpa", return_weights=True),
            ValueError,
            "cannot return the weights",
        ),
        (lambda: attention(x, x, x, backend="loop", dropout_p=0.1), ValueError, "does not support dropout"),
        (
            lambda: attention(x, x, x, dropout_p=1.0),
            ValueError,
            r"dropout probability must be in \[0, 1\), got 1.0",
        ),
        (
            lambda: attention(x.long(), x, x),
            TypeError,
            "query must be a floating-point tensor, got dtype torch.int64",
        ),
        (
            lambda: attention(torch.ones(3), x, x),
            ValueError,
            r"query must have shape \(..., length, width\), got \(3,\)",
        ),
        (
            lambda: attention(
                x.clone().index_put_((torch.tensor(1), torch.tensor(2), torch.tensor(3)), torch.tensor(float("nan"))),
                x,
                x,
            ),
            ValueError,
            r"query contains a non-finite value nan at index \(1, 2, 3\)",
        ),
        (
            lambda: attention(torch.randn(1, 6, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)),
            ValueError,
            r"query heads \(6\) must be a multiple of key/value heads \(4\)",
        ),
        (lambda: attention(x, x, x, scale=float("nan")), ValueError, "scale must be a finite number"),
        (lambda: attention(x, x, x, scale=float("inf")), ValueError, "got inf"),
        (lambda: attention(x, x, x, mask=torch.full((4, 4), float("inf"))), ValueError, r"NaN or \+inf"),
        (
            lambda: attention(
                torch.tensor([[1e20, 1.0], [0.0, 1.0]]), torch.tensor([[1e20, 1.0], [0.0, 1.0]]), x[0, :2, :2]
            ),
            ValueError,
            r"the scores overflowed torch.float32: \|q·k\| reaches 1e\+40",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_a_module_refuses_a_non_finite_scale() -> None:
    from selfattention import MultiHeadAttention

    with pytest.raises(ValueError, match="scale must be a finite number"):
        MultiHeadAttention(4, 4, 8, 0.0, 2, scale=float("nan"))


def test_training_config_refuses_non_finite_rates() -> None:
    from selfattention.training.loop import TrainConfig

    with pytest.raises(ValueError, match="learning_rate must be a finite number, got inf"):
        TrainConfig(learning_rate=float("inf"))
    with pytest.raises(ValueError, match="weight_decay must be a finite number, got nan"):
        TrainConfig(weight_decay=float("nan"))


@pytest.mark.parametrize(
    ("temperature", "message"),
    [(float("nan"), "finite number >= 0, got nan"), (float("inf"), "got inf"), (1e-40, "too small to sample")],
)
def test_sampling_refuses_temperatures_that_cannot_sample(temperature: float, message: str) -> None:
    from selfattention.generate import sample_next

    with pytest.raises(ValueError, match=message):
        sample_next(torch.tensor([[3.0, 1.0, 0.5]]), temperature=temperature)
