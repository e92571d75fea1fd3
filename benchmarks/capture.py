"""capture() on SmolLM2-135M: what recording every head costs, beside transformers' ``output_attentions``.

    python benchmarks/capture.py [--markdown FILE] [--tokens T] [--long T] [--top-k-tokens T] [--repeat N]

One run, side by side: our forward pass uncaptured and captured (every head of every layer: q, k, v, the
per-head context and each row's log-sum-exp, with the fused kernel), at ``--tokens`` and ``--long``;
transformers on the same GGUF file with its SDPA path and with ``output_attentions=True`` (which falls back
to its eager path) at ``--tokens``; the largest difference between the weights recomputed from the
log-sum-exp and the eager ``"math"`` backend's on the same inputs; and, in a fresh process, the peak memory
of keeping the top 16 keys of every row of every head at ``--top-k-tokens`` tokens (``capture_top_k``). Times are
medians of interleaved rounds: ratios are what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch

from llama import interleaved, load, prompt, timed
from timing import report


def _max_error(cap: Any) -> float:
    """Largest |recomputed α - eager α| over every head of every layer (the eager path on the same q, k, v)."""
    from selfattention.functional import attention

    worst = 0.0
    for _, record in cap.items():
        _, eager = attention(
            record.query, record.key, record.value, causal=record.causal, mask=record.mask,
            scale=record.scale, backend="math", return_weights=True,
        )  # fmt: skip
        worst = max(worst, float((record.weights - eager).abs().max()))
    return worst


def _peak_gib() -> float:
    """This process's peak resident memory since the last :func:`_reset_peak` (Linux's VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size


@torch.no_grad()
def top_k_memory(tokens: int) -> dict[str, float]:
    """In a child: peak memory of an uncaptured forward, then of ``capture_top_k(model, 16)`` around the same
    forward (the model loaded; loading's own peak is reset away first). Both forwards ask for the last
    position's logits only (``logits_to_keep=1``): all 8192 positions' logits would be 1.5 GiB, which an
    inspection of attention does not need."""
    from selfattention import capture_top_k

    model = load("ours")
    ids = prompt(1, tokens)
    _reset_peak()
    model(ids, logits_to_keep=1)
    before = _peak_gib()
    _reset_peak()
    start = time.perf_counter()
    with capture_top_k(model, 16) as cap:
        model(ids, logits_to_keep=1)
    kept = sum(record.weights.numel() for _, record in cap.items())
    return {"before_gib": before, "after_gib": _peak_gib(), "seconds": time.perf_counter() - start, "kept": kept}


def _child(tokens: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(tokens)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--tokens", type=int, default=512, help="sequence length for both libraries (default: 512)")
    parser.add_argument("--long", type=int, default=2048, help="longer sequence, ours only (default: 2048; 0: skip)")
    parser.add_argument("--top-k-tokens", type=int, default=8192, help="top-16 memory run (default: 8192; 0: skip)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(top_k_memory(args.child)))
        return
    from selfattention import capture

    ours, theirs, eager = load("ours"), load("transformers"), load("transformers")
    eager.set_attn_implementation("eager")  # what output_attentions needs (transformers' sdpa returns none)
    assert eager(input_ids=prompt(1, 8), output_attentions=True).attentions[0] is not None

    def captured(ids: torch.Tensor) -> None:
        with capture(ours):
            ours(ids)

    rows = ["| what | tokens | seconds | ratio |", "|---|---:|---:|---:|"]
    ids = prompt(1, args.tokens)
    times = interleaved(
        {
            "ours": timed(lambda: ours(ids)),
            "ours captured": timed(lambda: captured(ids)),
            "transformers sdpa": timed(lambda: theirs(input_ids=ids, use_cache=False)),
            "transformers output_attentions": timed(
                lambda: eager(input_ids=ids, use_cache=False, output_attentions=True)
            ),
        },
        args.repeat,
    )
    rows.append(f"| ours, uncaptured | {args.tokens} | {times['ours']:.3f} | 1.00x |")
    rows.append(f"| ours, capture() every head | {args.tokens} | {times['ours captured']:.3f} | "
                f"{times['ours captured'] / times['ours']:.2f}x |")  # fmt: skip
    rows.append(f"| transformers, sdpa | {args.tokens} | {times['transformers sdpa']:.3f} | 1.00x |")
    rows.append(
        f"| transformers, output_attentions=True (eager) | {args.tokens} | "
        f"{times['transformers output_attentions']:.3f} | "
        f"{times['transformers output_attentions'] / times['transformers sdpa']:.2f}x |"
    )
    if args.long:
        del theirs, eager  # memory for the long run
        long_ids = prompt(1, args.long)
        long = interleaved(
            {"ours": timed(lambda: ours(long_ids)), "captured": timed(lambda: captured(long_ids))}, args.repeat
        )
        rows.append(f"| ours, uncaptured | {args.long} | {long['ours']:.3f} | 1.00x |")
        rows.append(f"| ours, capture() every head | {args.long} | {long['captured']:.3f} | "
                    f"{long['captured'] / long['ours']:.2f}x |")  # fmt: skip
    with capture(ours) as cap:
        ours(ids)
    rows.append(f"| max \\|recomputed α - eager α\\|, every head, float32 | {args.tokens} | {_max_error(cap):.1e} | |")
    if args.top_k_tokens:
        memory = _child(args.top_k_tokens)
        extra = memory["after_gib"] - memory["before_gib"]
        rows.append(
            f"| capture_top_k(model, 16), every row and head: process peak {memory['after_gib']:.2f} GiB "
            f"(uncaptured forward: {memory['before_gib']:.2f} GiB; +{extra:.2f}) | "
            f"{args.top_k_tokens} | {memory['seconds']:.1f} | |"
        )
    report(rows, args.markdown)


if __name__ == "__main__":
    main()
