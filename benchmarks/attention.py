"""Exact attention side by side: the book-style matmul code, PyTorch's fused kernel, FlexAttention, and ours.

    python benchmarks/attention.py [--quick] [--markdown FILE] [--long] [--threads N] [--lengths T ...]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--heads H] [--masks M ...] [--impls I ...]
        [--budget-s SECONDS]

float32, B = 1, one head, D = 64, T = S in (1024, 4096, 16384) (``--quick``: 1024 only). Masks: dense,
causal, sliding_window(256), documents (16 equal documents), padding (the second half of the keys is
padding). Implementations:

* ``book``: ``attention(backend="math")``, the matmul-softmax-matmul code, on the materialised mask;
* ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` called directly, dense (on CUDA in
  half precision, the flash kernel); ``sdpa is_causal``; ``sdpa + mask``: with the equivalent dense
  boolean mask;
* ``flex``: PyTorch's FlexAttention as its documentation writes it: ``torch.compile(flex_attention)`` with
  a ``create_block_mask`` of the mask's ``mask_mod`` (written here, independently of ours; the block mask
  is built outside the timing). On the CPU forward only: FlexAttention has no CPU backward;
* ``auto``: ``attention(..., mask=<mask description>)`` as a user writes it; ``tiled`` and ``blocksparse``:
  the same call with that backend (on CUDA ``blocksparse`` is FlexAttention's kernel on our own tiles).

On the CPU each case runs in its own child process (forked from this one before any tensor work, so the
baseline is the imported library) and reports its peak resident memory (``ru_maxrss``, which includes that
baseline). On CUDA (``--device cuda``) the cases run in this process, timed after
``torch.cuda.synchronize()``, and report the peak of CUDA memory allocated during the case; ``--budget-s``
stops starting new cases after that many seconds, and the table so far is written after every case.
Compilation happens in the warm-up run, outside the timing. Times are the fastest of repeated runs (the
machine is shared): up to 7 (2 with ``--quick``, in 0.1 s), as many as fit a 2-second budget after the warm-up, so a
case slower than that budget is timed once. Milliseconds are printed to three significant digits below 10 ms
(a GPU's 0.13 ms is not rounded to 0.1). Effective GFLOP/s count
only the unmasked work: ``4·D`` per allowed (query, key) pair forward, 2.5 times that again backward (FlashAttention's
convention), so a skipped block makes a call faster, not its GFLOP/s higher. "% mm" is that rate over a
2048×2048 matmul's (8192×8192 on CUDA) in the same dtype, measured in the same run. ``--long`` adds the
causal forward+backward at 65,536 tokens (one run, no warm-up).
"""

from __future__ import annotations

import argparse
import functools
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
    "dense": ["book", "sdpa", "flex", "auto", "tiled"],
    "causal": ["book", "sdpa is_causal", "sdpa + mask", "flex", "auto", "blocksparse", "tiled"],
}
MASKED_IMPLS = ["book", "sdpa + mask", "flex", "auto", "tiled"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def description(kind: str, length: int) -> masks.MaskDescription | None:
    """The mask description of a benchmark mask kind (None for dense)."""
    return {
        "dense": None,
        "causal": masks.causal(),
        "sliding_window(256)": masks.sliding_window(256),
        "documents(16)": masks.documents(torch.arange(length) * 16 // length),
        "padding(S/2)": masks.padding([length // 2]),
    }[kind]


def flex_mask_mod(kind: str, length: int, device: torch.device) -> Callable[..., torch.Tensor] | None:
    """FlexAttention's ``mask_mod`` of a benchmark mask kind, as its documentation writes them (T = S)."""
    if kind == "dense":
        return None
    if kind == "causal":
        return lambda b, h, q, kv: q >= kv
    if kind == "sliding_window(256)":
        return lambda b, h, q, kv: (q >= kv) & (q - kv < 256)
    if kind == "documents(16)":
        document = (torch.arange(length, device=device) * 16 // length).to(torch.int32)
        return lambda b, h, q, kv: document[q] == document[kv]
    half = torch.tensor(length // 2, device=device)
    return lambda b, h, q, kv: kv < half


@functools.cache
def compiled_flex() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``, made once, so that its compiled kernels serve every case of a run."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_call(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``torch.compile(flex_attention)`` with the block mask of ``kind`` (built here, not timed)."""
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = compiled_flex()
    mod = flex_mask_mod(kind, q.shape[-2], q.device)
    blocks = None
    if mod is not None:
        blocks = create_block_mask(mod, None, None, q.shape[-2], k.shape[-2], device=q.device, _compile=True)
    return lambda: compiled(q, k, v, block_mask=blocks)


def call(impl: str, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A no-argument function that runs one implementation on one mask (masks built here, not timed)."""
    if impl == "flex":
        return flex_call(kind, q, k, v)
    rule = description(kind, q.shape[-2])
    dense = None
    if rule is not None and impl in ("book", "sdpa + mask"):  # only these take the (1, T, S) tensor
        dense = rule.materialize(1, 1, q.shape[-2], k.shape[-2], device=q.device)[0]
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


def synchronize() -> None:
    """Wait for queued CUDA work (a no-op without CUDA), so that a timer measures the work itself."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def best_ms(fn: Callable[[], object], budget_s: float, most: int) -> float:
    """Fastest milliseconds over as many runs as fit ``budget_s`` (at least 1, at most ``most``).

    The fastest run, not the median: on a shared machine the slower runs measure the other jobs.
    ``budget_s == 0`` means one run and no warm-up (the long case). The warm-up run also compiles.
    """
    if budget_s == 0:
        return seconds(fn) * 1e3
    seconds(fn)  # warm-up (and compilation)
    first = seconds(fn)  # sizes the number of runs
    samples = [first]
    for _ in range(max(0, min(most, int(budget_s / max(first, 1e-6))) - 1)):
        samples.append(seconds(fn))
    return min(samples) * 1e3


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Time one case forward and forward+backward; runs inside the child process (on CUDA, in this one)."""
    torch.manual_seed(0)
    length, device, dtype = case["T"], torch.device(case["device"]), DTYPES[case["dtype"]]
    shape = (1, case["heads"], length, D)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {}
    if case.get("forward", True):
        with torch.no_grad():
            result["fwd_ms"] = best_ms(call(case["impl"], case["mask"], q, k, v), case["budget"], case["most"])
    if case.get("backward", True):
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad = torch.randn(shape, device=device, dtype=dtype)
        fn = call(case["impl"], case["mask"], q, k, v)

        def forward_backward() -> None:
            q.grad = k.grad = v.grad = None
            fn().backward(grad)

        result["fb_ms"] = best_ms(forward_backward, case["budget"], case["most"])
    if device.type == "cuda":
        result["mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["pairs"] = case["heads"] * allowed_pairs(case["mask"], length)
    return result


def matmul_gflops(device: str = "cpu", dtype: str = "float32") -> float:
    size = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    return 2 * size**3 / best_ms(lambda: a @ b, 1.0, 20) / 1e6


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


def table(rows: list[dict[str, Any]], mm: float, memory: str = "peak RSS MiB") -> str:
    lines = [
        "| T | mask | implementation | fwd ms | fwd GFLOP/s | fwd % mm | fwd+bwd ms | fwd+bwd GFLOP/s "
        f"| fwd+bwd % mm | {memory} |",
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
                cells += [f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}", f"{rate:.1f}", f"{100 * rate / mm:.0f}%"]
            cells.append(f"{row['mem_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    lengths = [1024] if args.quick else args.lengths
    budget, most = (0.1, 2) if args.quick else (2.0, 7)
    common = {"device": args.device, "dtype": args.dtype, "heads": args.heads}
    out = []
    for length in lengths:
        for kind in args.masks:
            for impl in IMPLS.get(kind, MASKED_IMPLS):
                if (impl == "book" and length > args.book_max) or (args.impls and impl not in args.impls):
                    continue
                case = {"T": length, "mask": kind, "impl": impl, "budget": budget, "most": most, **common}
                if impl == "flex" and args.device == "cpu":
                    case["backward"] = False  # "FlexAttention does not support backward on CPU"
                out.append(case)
    if args.long:
        for impl in ("auto", "blocksparse"):
            out.append({"T": 65536, "mask": "causal", "impl": impl, "budget": 0, "most": 1, "forward": False,
                        **common})  # fmt: skip
    return out


def run_all(args: argparse.Namespace, started: float, mm: float) -> list[dict[str, Any]]:
    """Every case (each in a child process on the CPU); on CUDA, up to ``--budget-s``, writing as it goes."""
    rows: list[dict[str, Any]] = []
    for case in cases(args):
        if args.device == "cuda" and args.budget_s and time.perf_counter() - started > args.budget_s:
            print(f"  --budget-s {args.budget_s:.0f} reached: the remaining cases are left out", file=sys.stderr)
            break
        row = dict(case)  # on the CPU the parent runs no tensor work: forking after it could deadlock thread pools
        try:
            row.update(run_case(case) if args.device == "cuda" else in_child(run_case, case))
        except Exception as err:  # out of memory, a compile failure: a row that says so, and the next case
            row["error"] = str(err).splitlines()[0][:60] if str(err) else type(err).__name__
            if args.device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {case['T']:>6} {case['mask']:<20} {case['impl']:<15} {json.dumps(row.get('fwd_ms'))} "
              f"{json.dumps(row.get('fb_ms'))} {row.get('error', '')}", file=sys.stderr, flush=True)  # fmt: skip
        if args.device == "cuda" and args.markdown:
            write(args, rows, mm, started)
    return rows


def write(args: argparse.Namespace, rows: list[dict[str, Any]], mm: float, started: float) -> str:
    """The header and table; also written to ``--markdown``."""
    where = f"{torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    header = (
        f"torch {torch.__version__}, {where}, {args.dtype}, B=1, H={args.heads}, D={D}; "
        f"{'2048x2048' if args.device == 'cpu' else '8192x8192'} matmul {mm:.1f} GFLOP/s; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    memory = "peak RSS MiB" if args.device == "cpu" else "peak CUDA MiB"
    text = header + "\n\n" + table(rows, mm, memory)
    if args.markdown:
        from selfattention.files import write_text

        write_text(args.markdown, text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens only, fewer repetitions")
    parser.add_argument("--long", action="store_true", help="add causal forward+backward at 65,536 tokens")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384], help="T = S values")
    parser.add_argument("--book-max", type=int, default=4096, help="longest T for the book-style code")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="default: float32")
    parser.add_argument("--heads", type=int, default=1, help="H (default: 1)")
    parser.add_argument("--masks", nargs="*", choices=MASKS, default=MASKS, help="default: all")
    parser.add_argument("--impls", nargs="*", help="only these implementations (default: all)")
    parser.add_argument("--budget-s", type=float, help="on CUDA: start no case after this many seconds")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    # every mask kind, dtype and shape is one more compiled FlexAttention; past dynamo's default limit (8) it
    # would quietly run FlexAttention's eager reference, which builds every score
    from torch import _dynamo

    _dynamo.config.recompile_limit = 256
    started = time.perf_counter()
    measure = (lambda: matmul_gflops(args.device, args.dtype)) if args.device == "cuda" else None
    mm = measure() if measure else in_child(matmul_gflops)
    rows = run_all(args, started, mm)
    print(write(args, rows, max(mm, measure() if measure else in_child(matmul_gflops)), started))


if __name__ == "__main__":
    main()
