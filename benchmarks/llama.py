"""SmolLM2-135M: our Llama against transformers' LlamaForCausalLM (SDPA attention), the same GGUF file, float32.

    python benchmarks/llama.py [--markdown FILE] [--repeat N] [--tokens T] [--decode N] [--threads N]

Rows: load time (each side in a fresh process: read, dequantize, build; transformers also builds its
tokenizer, ours too), one forward pass over ``T`` tokens at batch 1 and 4, decoding with a KV cache (tokens
per second for ``N`` greedy tokens after a ``T``-token prompt), and peak resident memory of the fresh process
that loaded the model and ran one forward at batch 1 and the decoding. Times are medians over ``--repeat``
rounds in which both sides run in turn, so that load from elsewhere on a shared machine falls on both alike.
Needs the test extras (`make install-test`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from timing import report


def load(side: str) -> Any:
    """The model of ``side`` ("ours" or "transformers") in eval mode."""
    from selfattention.loaders.gguf import load_smollm2, smollm2_path

    if side == "ours":
        return load_smollm2().model
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = smollm2_path()
    transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # as load_smollm2 does
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


def forward(side: str, model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids (B, T)``."""
    return model(ids)[0] if side == "ours" else model(input_ids=ids, use_cache=False).logits


def decode(side: str, model: Any, ids: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` greedy tokens with a KV cache after prefilling ``ids (1, T)`` (prefill not timed)."""
    if side == "ours":
        caches = model.make_kv_caches(1, ids.shape[1] + steps)
        logits = model(ids, kv_caches=caches)[0]
        start = time.perf_counter()
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), kv_caches=caches)[0]
        return time.perf_counter() - start
    out = model(input_ids=ids, use_cache=True)
    cache, logits = out.cache, out.logits
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits
    return time.perf_counter() - start


def prompt(batch: int, tokens: int) -> torch.Tensor:
    return torch.randint(100, 40000, (batch, tokens), generator=torch.Generator().manual_seed(batch))


@torch.no_grad()
def fresh_process(side: str, tokens: int, steps: int) -> dict[str, float]:
    """Run in a child: load time and peak memory (MiB) after a forward at batch 1 and decoding."""
    start = time.perf_counter()
    model = load(side)
    seconds = time.perf_counter() - start
    forward(side, model, prompt(1, tokens))
    decode(side, model, prompt(1, tokens), steps)
    return {"load_s": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_child(side: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", side, "--tokens", str(args.tokens), "--decode", str(args.decode)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def interleaved(fns: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Median seconds of each function (which returns its own seconds) over ``repeat`` rounds after a warm-up.

    The order alternates from round to round, so that neither side always runs right after the other.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for round_ in range(repeat):
        for name, fn in list(fns.items())[:: -1 if round_ % 2 else 1]:
            samples[name].append(fn())
    return {name: statistics.median(values) for name, values in samples.items()}


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--tokens", type=int, default=512, help="prompt length T (default: 512)")
    parser.add_argument("--decode", type=int, default=16, help="decoded tokens N (default: 16)")
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(fresh_process(args.child, args.tokens, args.decode)))
        return
    sides = ("ours", "transformers")
    fresh = {side: in_child(side, args) for side in sides}
    models = {side: load(side) for side in sides}
    rows = ["| measure | ours | transformers (SDPA) | transformers / ours |", "|---|---:|---:|---:|"]

    def row(label: str, ours: float, theirs: float, unit: str, higher_is_better: bool = False) -> None:
        ratio = ours / theirs if higher_is_better else theirs / ours
        rows.append(f"| {label} | {ours:.3g} {unit} | {theirs:.3g} {unit} | {ratio:.2f}x |")

    row("load (fresh process)", fresh["ours"]["load_s"], fresh["transformers"]["load_s"], "s")
    for batch in (1, 4):
        ids = prompt(batch, args.tokens)
        fns = {side: timed(lambda s=side, i=ids: forward(s, models[s], i)) for side in sides}
        seconds = interleaved(fns, args.repeat)
        row(f"forward B={batch}, T={args.tokens}", seconds["ours"], seconds["transformers"], "s")
    ids = prompt(1, args.tokens)
    fns = {side: (lambda s=side: decode(s, models[s], ids, args.decode)) for side in sides}
    seconds = interleaved(fns, args.repeat)
    per_second = {side: args.decode / seconds[side] for side in sides}
    row(f"decode at {args.tokens} tokens of context", per_second["ours"], per_second["transformers"], "tok/s", True)
    row("peak memory (fresh process)", fresh["ours"]["peak_mib"], fresh["transformers"]["peak_mib"], "MiB")
    report(rows, args.markdown)
    print("ratio: above 1 means ours is faster or smaller")


if __name__ == "__main__":
    main()
