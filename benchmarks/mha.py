"""Multi-head attention modules side by side: forward (eval, no grad) and forward+backward, causal.

    python benchmarks/mha.py [--quick] [--repeat N] [--markdown FILE]

Four modules with the same weights, input ``(B, T, C)`` and ``H`` heads (by default the shape of the well-known
comparison of chapter-3 implementations: (8, 1024, 768), 12 heads):

* book-style: separate ``nn.Linear`` projections, ``q @ kᵀ``, ``masked_fill`` with a stored triangular mask,
  softmax, ``@ v`` (the chapter-3 ``MultiHeadAttention`` recipe);
* SDPA-based: one fused ``Linear`` for Q, K and V, then ``scaled_dot_product_attention(is_causal=True)``;
* ours: :class:`selfattention.MultiHeadAttention` with ``backend="auto"``;
* ``torch.nn.MultiheadAttention`` with a causal ``attn_mask`` and ``need_weights=False``.

Before timing, the outputs are checked to agree. Each round runs every module once, in turn; times are the
best of ``--repeat`` rounds, and each ratio to the SDPA-based module is the median over rounds of the ratio
within a round (neighbouring runs share the machine's load). The ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattention import MultiHeadAttention


class BookStyle(nn.Module):
    """The textbook recipe: three projections, explicit scores, a stored mask, softmax, weighted sum."""

    def __init__(self, width: int, context_length: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.W_query = nn.Linear(width, width, bias=False)
        self.W_key = nn.Linear(width, width, bias=False)
        self.W_value = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
        q, k, v = (w(x).view(shape).transpose(1, 2) for w in (self.W_query, self.W_key, self.W_value))
        scores = q @ k.transpose(2, 3)  # (B, H, T, T)
        future = self.mask.bool()[:tokens, :tokens]
        scores = scores.masked_fill(future, -torch.inf)
        weights = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)  # (B, H, T, D) -> (B, T, C)
        return self.out_proj(context)


class SDPABased(nn.Module):
    """One fused projection for Q, K, V and PyTorch's fused attention kernel."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        # (B, T, 3C) -> (B, T, 3, H, D) -> (3, B, H, T, D)
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out_proj(context.transpose(1, 2).reshape(batch, tokens, width))


class TorchMHA(nn.Module):
    """``torch.nn.MultiheadAttention`` called as self-attention with a causal mask (``True`` = ignore)."""

    def __init__(self, inner: nn.MultiheadAttention, context_length: int) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("future", torch.ones(context_length, context_length, dtype=torch.bool).triu(1))

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.shape[1]
        out, _ = self.inner(x, x, x, attn_mask=self.future[:tokens, :tokens], need_weights=False)
        return out


def build(width: int, tokens: int, heads: int) -> dict[str, nn.Module]:
    """The four modules, all with the weights of ours."""
    torch.manual_seed(123)
    ours = MultiHeadAttention(width, width, tokens, 0.0, heads)
    book = BookStyle(width, tokens, heads)
    book.load_state_dict(ours.state_dict(), strict=False)
    sdpa = SDPABased(width, heads)
    with torch.no_grad():
        sdpa.qkv.weight.copy_(torch.cat([ours.W_query.weight, ours.W_key.weight, ours.W_value.weight]))
        sdpa.out_proj.load_state_dict(ours.out_proj.state_dict())
    modules = {
        "book-style": book,
        "SDPA-based": sdpa,
        "ours": ours,
        "nn.MultiheadAttention": TorchMHA(ours.to_torch(), tokens),
    }
    return {name: module.eval() for name, module in modules.items()}


def check_agree(modules: dict[str, nn.Module], x: Tensor) -> None:
    """Raise unless every module gives the reference (book-style) output, to float32 accuracy."""
    with torch.no_grad():
        outputs = {name: module(x) for name, module in modules.items()}
    want = outputs["book-style"]
    for name, got in outputs.items():
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def forward(module: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def forward_backward(module: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
        return None

    return run


def measure(cases: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Milliseconds per case and round; each round runs every case once, after a warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeat + 1):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if round_:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def summarise(samples: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float]]:
    """Per case: the best time (noise only ever adds time) and the median over rounds of the ratio to
    ``baseline`` in the same round (neighbouring runs share the machine's load, so the ratio is steadier)."""
    return {
        name: (
            min(times),
            statistics.median(t / b for t, b in zip(times, samples[baseline], strict=True)),
        )
        for name, times in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after a warm-up (default: 3)")
    parser.add_argument("--quick", action="store_true", help="a small shape (2, 128, 768) for a smoke run")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to this Markdown file")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.tokens = 2, 128
    modules = build(args.width, args.tokens, args.heads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.width)
    check_agree(modules, x)
    fwd = summarise(measure({name: forward(m, x) for name, m in modules.items()}, args.repeat), "SDPA-based")
    x_grad = x.clone().requires_grad_(True)
    for module in modules.values():
        module.train()  # dropout is 0 everywhere: training mode only switches the path a module may take
    cases = {name: forward_backward(m, x_grad) for name, m in modules.items()}
    both = summarise(measure(cases, args.repeat), "SDPA-based")
    shape = f"input ({args.batch}, {args.tokens}, {args.width}), {args.heads} heads, causal"
    lines = [
        "| module | forward ms | vs SDPA-based | forward+backward ms | vs SDPA-based |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in modules:
        (f_ms, f_ratio), (b_ms, b_ratio) = fwd[name], both[name]
        lines.append(f"| {name} | {f_ms:.1f} | {f_ratio:.2f}x | {b_ms:.1f} | {b_ratio:.2f}x |")
    header = (
        f"{shape}; torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeat} rounds; "
        "ratios: median of per-round ratios"
    )
    table = "\n".join(lines)
    print(f"{header}\n{table}")
    if args.markdown:
        from selfattention.files import write_text

        write_text(args.markdown, f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
