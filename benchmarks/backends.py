"""Compare the backends side by side on a few shapes, forward only, to justify what ``auto`` picks.

    python benchmarks/backends.py [--markdown FILE]

Prints milliseconds per call (median of repeated runs) and each backend's time relative to ``sdpa``.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from selfattention import attention
from timing import median_seconds, report

MS = 1e3  # seconds -> milliseconds
SHAPES = [  # (B, H, T, D, causal)
    (1, 1, 6, 3, False),
    (8, 4, 64, 32, True),
    (4, 12, 256, 64, False),
    (4, 12, 256, 64, True),
    (1, 12, 1024, 64, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    rows = ["| B, H, T, D | causal | loop ms | math ms | sdpa ms | math / sdpa |", "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for b, h, t, d, causal in SHAPES:
            q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
            repeat = 20 if t <= 256 else 5
            ms = {
                name: MS * median_seconds(partial(attention, q, k, v, causal=causal, backend=name), repeat)
                for name in ("math", "sdpa")
            }
            loop = (
                MS * median_seconds(partial(attention, q, k, v, causal=causal, backend="loop"), 3)
                if t <= 64
                else float("nan")
            )
            loop_text = f"{loop:.2f}" if loop == loop else "(too slow)"
            rows.append(
                f"| {b}, {h}, {t}, {d} | {causal} | {loop_text} | {ms['math']:.3f} | {ms['sdpa']:.3f} "
                f"| {ms['math'] / ms['sdpa']:.2f}x |"
            )
    report(rows, args.markdown)


if __name__ == "__main__":
    main()
