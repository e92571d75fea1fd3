"""Training tests run tiny models: one intra-op thread is faster than two (no hand-off between threads for
kernels of microseconds), and much faster when other jobs load the machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run each test with ``torch.set_num_threads(1)``, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
