"""Ring attention across processes, checked against attention on one process.

    torchrun --nproc_per_node=2 examples/ring_attention.py [--length 1024] [--causal] [--layout zigzag]
    python examples/ring_attention.py --processes 4 [...]     # the same, started without torchrun

Every process makes the same seeded sequence, keeps only its slice (``shard_sequence``), runs
``ring_attention`` forward and backward, and gathers the results (``gather_sequence``). Rank 0 then
prints the largest difference from ``selfattention.attention`` on the whole sequence in one process.
Under torchrun the process group is NCCL when GPUs are present and gloo otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from selfattention import attention
from selfattention.distributed import gather_sequence, ring_attention, shard_sequence
from selfattention.launch import run_local


def compare(length: int, heads: int, dim: int, causal: bool, layout: str) -> dict[str, float | int]:
    """Run on every rank of an initialised process group; return the largest differences (rank 0's view)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    generator = torch.Generator().manual_seed(0)  # the same whole sequence on every rank
    q, k, v, grad_out = (torch.randn(2, heads, length, dim, generator=generator).to(device) for _ in range(4))

    q_local, k_local, v_local = (shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v))  # type: ignore[arg-type]
    start = time.perf_counter()
    out_local = ring_attention(q_local, k_local, v_local, causal=causal, layout=layout)  # type: ignore[arg-type]
    out_local.backward(shard_sequence(grad_out, layout=layout))  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    ring = {
        name: gather_sequence(t, layout=layout)  # type: ignore[arg-type]
        for name, t in (("out", out_local), ("dq", q_local.grad), ("dk", k_local.grad), ("dv", v_local.grad))
    }

    q, k, v = (t.requires_grad_() for t in (q, k, v))
    expected = attention(q, k, v, causal=causal)
    expected.backward(grad_out)
    single = {"out": expected, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    report = {f"max |{name} - single process|": (ring[name] - single[name]).abs().max().item() for name in ring}
    return {**report, "ring forward + backward on rank 0, s": seconds, "tokens on rank 0": q_local.shape[-2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="total sequence length")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous")
    parser.add_argument("--processes", type=int, default=2, help="processes to start when not under torchrun")
    args = parser.parse_args()
    options = (args.length, args.heads, args.dim, args.causal, args.layout)

    if "RANK" in os.environ:  # started by torchrun: this process is one rank
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # A finite timeout: if another rank dies, this one raises instead of waiting forever.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=2))
        report, size = compare(*options), dist.get_world_size()
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return
    else:
        size = args.processes
        report = run_local(compare, size, *options, threads=max(1, (os.cpu_count() or 1) // size))[0]
    print(f"{size} processes, {args.length} tokens, causal={args.causal}, layout={args.layout}")
    for name, value in report.items():
        print(f"  {name}: {value if isinstance(value, int) else format(value, '.3g')}")


if __name__ == "__main__":
    main()
