"""Exact attention side by side: the book-style matmul code, PyTorch's fused kernel, and ours, per mask.

    python benchmarks/attention.py [--quick] [--markdown FILE] [--long] [--threads N] [--lengths T ...]

float32, B = 1, one head, D = 64, T = S in (1024, 4096, 16384) (``--quick``: 1024 only). Masks: dense,
causal, sliding_window(256), documents (16 equal documents), padding (the second half of the keys is
padding). Implementations:

* ``book``: ``attention(backend="math")``, the matmul-softmax-matmul code, on the materialised mask;
* ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` called directly, dense;
  ``sdpa is_causal``; ``sdpa + mask``: with the equivalent dense boolean mask;
* ``auto``: ``attention(..., mask=<mask description>)`` as a user writes it; ``tiled`` and ``blocksparse``:
  the same call with that backend.

Each case runs in its own child process (forked from this one before any tensor work, so the baseline
is the imported library) and reports its peak resident memory (``ru_maxrss``, which includes that
baseline). Times are the fastest of repeated runs (the machine is shared). Effective GFLOP/s count
only the unmasked work: ``4·D`` per allowed (query, key) pair forward, 2.5 times that again backward (FlashAttention's
convention), so a skipped block makes a call faster, not its GFLOP/s higher. "% mm" is that rate over a
2048×2048 float32 matmul's, measured in the same run. ``--long`` adds the causal forward+backward at
65,536 tokens (one run, no warm-up).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from selfattention import attention, masks

D = 64
MASKS = ["dense", "causal", "sliding_window(256)", "documents(16)", "padding(S/2)"]
IMPLS = {
    "dense": ["book", "sdpa", "auto", "tiled"],
    "causal": ["book", "sdpa is_causal", "sdpa + mask", "auto", "blocksparse", "tiled"],
}
MASKED_IMPLS = ["book", "sdpa + mask", "auto", "tiled"]


def description(kind: str, length: int) -> masks.MaskDescription | None:
    """The mask description of a benchmark mask kind (None for dense)."""
    return {
        "dense": None,
        "causal": masks.causal(),
        "sliding_window(256)": masks.sliding_window(256),
        "documents(16)": masks.documents(torch.arange(length) * 16 // length),
        "padding(S/2)": masks.padding([length // 2]),
    }[kind]


def call(impl: str, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A no-argument function that runs one implementation on one mask (masks built here, not timed)."""
    rule = description(kind, q.shape[-2])
    dense = None
    if rule is not None and impl in ("book", "sdpa + mask"):  # only these take the (1, T, S) tensor
        dense = rule.materialize(1, 1, q.shape[-2], k.shape[-2])[0]
    if impl == "book":
        return lambda: attention(q, k, v, mask=dense, backend="math")
    if impl == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if impl == "sdpa is_causal":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "sdpa + mask":
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    backend = "auto" if impl == "auto" else impl
    return lambda: attention(q, k, v, mask=rule, backend=backend)


def best_ms(fn: Callable[[], object], budget_s: float, most: int) -> float:
    """Fastest milliseconds over as many runs as fit ``budget_s`` (at least 1, at most ``most``).

    The fastest run, not the median: on a shared machine the slower runs measure the other jobs.
    ``budget_s == 0`` means one run and no warm-up (the long case).
    """
    if budget_s == 0:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    fn()  # warm-up, also sizes the number of runs
    first = time.perf_counter() - start
    samples = []
    for _ in range(max(1, min(most, int(budget_s / max(first, 1e-6))))):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples) * 1e3


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Time one case forward and forward+backward; runs inside the child process."""
    torch.manual_seed(0)
    length = case["T"]
    q, k, v = (torch.randn(1, 1, length, D) for _ in range(3))
    result: dict[str, Any] = {}
    if case.get("forward", True):
        with torch.no_grad():
            result["fwd_ms"] = best_ms(call(case["impl"], case["mask"], q, k, v), case["budget"], case["most"])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grad = torch.randn(1, 1, length, D)
    fn = call(case["impl"], case["mask"], q, k, v)

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        fn().backward(grad)

    result["fb_ms"] = best_ms(forward_backward, case["budget"], case["most"])
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["pairs"] = allowed_pairs(case["mask"], length)
    return result


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / best_ms(lambda: a @ b, 1.0, 20) / 1e6


def _child(target: Callable[..., Any], args: tuple, queue: Any) -> None:
    try:
        queue.put(("ok", target(*args)))
    except Exception as err:  # reported by the parent as a row that failed
        queue.put(("error", f"{type(err).__name__}: {err}"))


def in_child(target: Callable[..., Any], *args: Any) -> Any:
    """Run ``target(*args)`` in a forked child process and return its result."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(target, args, queue))
    process.start()
    status, value = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def allowed_pairs(kind: str, length: int) -> int:
    """Number of (query, key) pairs the mask allows, counted from the description's tiles exactly."""
    rule = description(kind, length)
    if rule is None:
        return length * length
    total = 0
    for start in range(0, length, 1024):
        stop = min(start + 1024, length)
        total += int(rule.block(1, 1, (start, stop), (0, length), length, length).sum())
    return total


def table(rows: list[dict[str, Any]], mm: float) -> str:
    lines = [
        "| T | mask | implementation | fwd ms | fwd GFLOP/s | fwd % mm | fwd+bwd ms | fwd+bwd GFLOP/s "
        "| fwd+bwd % mm | peak RSS MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        flops = 4 * D * row.get("pairs", 0)
        cells = [str(row["T"]), row["mask"], row["impl"]]
        if "error" in row or "pairs" not in row:
            cells += [row.get("error", "failed")] + [""] * 6
        else:
            for key, factor in (("fwd_ms", 1.0), ("fb_ms", 3.5)):
                ms = row.get(key)
                if ms is None:
                    cells += ["", "", ""]
                    continue
                rate = flops * factor / ms / 1e6
                cells += [f"{ms:.1f}", f"{rate:.1f}", f"{100 * rate / mm:.0f}%"]
            cells.append(f"{row['rss_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    lengths = [1024] if args.quick else args.lengths
    budget, most = (0.2, 3) if args.quick else (2.0, 7)
    out = []
    for length in lengths:
        for kind in MASKS:
            for impl in IMPLS.get(kind, MASKED_IMPLS):
                if impl == "book" and length > args.book_max:
                    continue
                out.append({"T": length, "mask": kind, "impl": impl, "budget": budget, "most": most})
    if args.long:
        for impl in ("auto", "blocksparse"):
            out.append({"T": 65536, "mask": "causal", "impl": impl, "budget": 0, "most": 1, "forward": False})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens only, fewer repetitions")
    parser.add_argument("--long", action="store_true", help="add causal forward+backward at 65,536 tokens")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384], help="T = S values")
    parser.add_argument("--book-max", type=int, default=4096, help="longest T for the book-style code")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    mm_before = in_child(matmul_gflops)
    rows = []
    for case in cases(args):
        row = dict(case)  # the parent runs no tensor work: forking after it could deadlock thread pools
        try:
            row.update(in_child(run_case, case))
        except RuntimeError as err:
            row["error"] = str(err).splitlines()[0][:60]
        rows.append(row)
        print(f"  {case['T']:>6} {case['mask']:<20} {case['impl']:<15} {json.dumps(row.get('fb_ms'))}",
              file=sys.stderr, flush=True)  # fmt: skip
    mm = max(mm_before, in_child(matmul_gflops))
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, B=1, H=1, D={D}; "
        f"2048x2048 matmul {mm:.1f} GFLOP/s (best of start and end: {mm_before:.1f} at start); "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    text = header + "\n\n" + table(rows, mm)
    print(text)
    if args.markdown:
        from selfattention.files import write_text

        write_text(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
