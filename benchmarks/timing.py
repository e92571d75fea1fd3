"""Timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this imports as ``timing``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up run."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def report(rows: list[str], markdown: str | None) -> None:
    """Print the torch version, thread count and the Markdown table ``rows``; also write the table to ``markdown``."""
    import torch

    from selfattention.files import write_text

    table = "\n".join(rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n{table}")
    if markdown:
        write_text(markdown, table + "\n")
