"""Ring attention in N = 1, 2, 4 local processes at one total sequence length: time and memory per process.

    python benchmarks/ring.py [--length 8192] [--heads 8] [--dim 128] [--layout zigzag] [--no-causal]
                              [--repeat 1] [--markdown FILE]

Each rank holds ``length / N`` tokens, runs ``ring_attention`` forward and backward (gloo on the loopback,
one thread per process), and reports

* the median milliseconds of one forward + backward (the slowest rank's, after a barrier), wall-clock and
  CPU time of the process (on a shared machine the CPU time shows how the work divides, whatever else
  runs), and
* its peak resident memory *above* what the process held before it made its slice (Linux ``VmHWM``
  after resetting it through ``/proc/self/clear_refs``), in a run of its own: the memory the sequence
  costs one process. For that run glibc's allocator is told to give large blocks back when they are freed
  (see ``_pin_allocator``), so that resident memory follows the live tensors. The fixed cost of a process
  with torch loaded (a few hundred MiB) is printed apart.

With ``N`` processes on fewer than ``N`` cores the processes share cores, so times stop improving there.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from selfattention.distributed import ring_attention, shard_sequence
from selfattention.launch import run_local

PROCESSES = (1, 2, 4)


def _memory_mib() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and its high-water mark (VmHWM), in MiB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def _reset_peak() -> None:
    """Make VmHWM start again from the current resident memory (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def _pin_allocator() -> None:
    """Make resident memory follow the live tensors: glibc then maps every block of 1 MiB or more on its own
    and unmaps it when freed (a fixed M_MMAP_THRESHOLD; by default the threshold grows as large blocks are
    freed, and freed memory stays resident for reuse), and returns what it holds free now (malloc_trim)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)
    libc.malloc_trim(0)


def _measure(length: int, heads: int, dim: int, causal: bool, layout: str, repeat: int) -> dict[str, float]:
    """On each rank: warm up, time forward + backward on this rank's slice, then measure its peak memory."""
    options = {"causal": causal, "layout": layout}
    warm = torch.randn(1, heads, 8 * dist.get_world_size(), dim)
    warm = shard_sequence(warm, layout=layout).requires_grad_()  # type: ignore[arg-type]
    ring_attention(warm, warm, warm, **options).sum().backward()  # type: ignore[arg-type]
    local = shard_sequence(torch.arange(length).view(length, 1), layout=layout).shape[0]  # type: ignore[arg-type]

    def slice_of_inputs() -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(dist.get_rank())
        return [torch.randn(1, heads, local, dim, generator=generator) for _ in range(4)]

    q, k, v, grad_out = slice_of_inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    wall, cpu = [], []
    for _ in range(repeat):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        ring_attention(q, k, v, **options).backward(grad_out)  # type: ignore[arg-type]
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)

    # Memory in a run of its own, from before the slice exists to the end of the backward pass.
    del q, k, v, grad_out, warm
    gc.collect()
    _pin_allocator()
    _reset_peak()
    before = _memory_mib()["VmRSS"]
    q, k, v, grad_out = slice_of_inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ring_attention(q, k, v, **options).backward(grad_out)  # type: ignore[arg-type]
    return {
        "ms": statistics.median(wall),
        "cpu": statistics.median(cpu),
        "peak": _memory_mib()["VmHWM"] - before,
        "fixed": before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="total sequence length L")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128, help="head width D (= E)")
    parser.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (median)")
    parser.add_argument("--markdown", help="also write the tables to this Markdown file")
    args = parser.parse_args()

    def run(n: int, layout: str) -> list[dict[str, float]]:
        shape = (args.length, args.heads, args.dim, args.causal, layout, args.repeat)
        return run_local(_measure, n, *shape, timeout=1800)

    rows = [
        "| processes N | tokens per process | fwd+bwd wall ms | speed-up | CPU ms per process "
        "| peak MiB per process | vs N=1 | 1/N | MiB of one (B, H, L/N, D) tensor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_n, fixed = {}, []
    for n in PROCESSES:
        by_n[n] = ranks = run(n, args.layout)
        worst = {key: max(r[key] for r in ranks) for key in ("ms", "cpu", "peak")}
        first = {key: max(r[key] for r in by_n[1]) for key in ("ms", "cpu", "peak")}
        fixed.append(max(r["fixed"] for r in ranks))
        rows.append(
            f"| {n} | {args.length // n} | {worst['ms']:.0f} | {first['ms'] / worst['ms']:.2f}x "
            f"| {worst['cpu']:.0f} | {worst['peak']:.1f} | {worst['peak'] / first['peak']:.2f} | {1 / n:.2f} "
            f"| {args.heads * (args.length // n) * args.dim * 4 / 2**20:.1f} |"
        )
    tables = ["\n".join(rows)]
    if args.causal:  # how evenly the causal work divides, in both layouts
        n = PROCESSES[-1]
        other = "contiguous" if args.layout == "zigzag" else "zigzag"
        balance = {args.layout: by_n[n], other: run(n, other)}
        rows = [
            f"| layout (N={n}, causal) | CPU ms of each rank | slowest / fastest | fwd+bwd wall ms |",
            "|---|---|---|---|",
        ]
        for layout in ("contiguous", "zigzag"):
            cpu = [r["cpu"] for r in balance[layout]]
            wall = max(r["ms"] for r in balance[layout])
            rows.append(f"| {layout} | {', '.join(f'{c:.0f}' for c in cpu)} | {max(cpu) / min(cpu):.2f} | {wall:.0f} |")
        tables.append("\n".join(rows))
    shape = f"B=1, H={args.heads}, L={args.length}, D={args.dim}, causal={args.causal}, layout={args.layout}"
    print(f"torch {torch.__version__}, float32, {shape}, 1 thread per process, gloo on the loopback")
    print("\n\n".join(tables))
    print(f"fixed memory of one process before its slice (torch loaded): {max(fixed):.0f} MiB")
    if args.markdown:
        from selfattention.files import write_text

        write_text(args.markdown, "\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
