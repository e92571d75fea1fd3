"""What ``attention(..., backend="auto")`` costs over calling the fused kernel directly, dense and causal.

    python benchmarks/auto_overhead.py [--length T] [--threads N] [--rounds R]

Both sides run the same kernel (auto picks ``sdpa`` for these calls), so the ratio is the price of the
checks and the dispatch. The calls are interleaved round by round and each keeps its fastest time, so a
busy moment of a shared machine does not land on one side only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from selfattention import attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="T = S (default 1024)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, args.length, 64, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 1, args.length, 64)

    def forward_backward(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            q.grad = k.grad = v.grad = None
            fn().backward(grad)

        return run

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    cases: dict[tuple[str, str, str], Callable[[], object]] = {}
    for causal in (False, True):
        mask = "causal" if causal else "dense"
        cases[(mask, "fwd", "sdpa")] = lambda c=causal: F.scaled_dot_product_attention(qd, kd, vd, is_causal=c)
        cases[(mask, "fwd", "auto")] = lambda c=causal: attention(qd, kd, vd, causal=c)
        cases[(mask, "fwd+bwd", "sdpa")] = forward_backward(
            lambda c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)
        )
        cases[(mask, "fwd+bwd", "auto")] = forward_backward(lambda c=causal: attention(q, k, v, causal=c))
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.rounds):
        for key, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], (time.perf_counter() - start) * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T = S = {args.length}, D = 64, float32")
    print("| mask | pass | sdpa ms | auto ms | auto / sdpa |\n|---|---|---:|---:|---:|")
    for mask in ("dense", "causal"):
        for kind in ("fwd", "fwd+bwd"):
            sdpa, auto = best[(mask, kind, "sdpa")], best[(mask, kind, "auto")]
            print(f"| {mask} | {kind} | {sdpa:.2f} | {auto:.2f} | {auto / sdpa:.2f} |")


if __name__ == "__main__":
    main()
