"""Generation with and without the KV cache, and training speed against the book's attention, side by side.

    python benchmarks/generate.py [--threads N] [--markdown FILE]

Table 1: a GPT (4 layers, 4 heads, width 128, 65 characters, context 512, untrained: speed does not depend
on the weights) continues a prompt so that the sequence ends at 64, 256 or 512 tokens; tokens/s counts the
new tokens, prefill included, median of repeated runs, both paths greedy (and checked to agree).

Table 2: training tokens/s (forward, backward, AdamW step) of the same GPT with our ``MultiHeadAttention``
(``backend="auto"``: the fused kernel) and with the attention written the book's way (scores by matmul,
``masked_fill`` with a ``triu`` mask, softmax, matmul), same weights, batch 12.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch import Tensor, nn

from selfattention.generate import generate
from selfattention.models.gpt import GPT, GPTConfig
from selfattention.training.loop import TrainConfig, make_optimizer
from timing import median_seconds

NEW_TOKENS = 32


class BookAttention(nn.Module):
    """Multi-head causal attention as the chapter-3 code writes it: explicit scores, triu mask, softmax."""

    def __init__(self, mha: nn.Module, context_length: int) -> None:
        super().__init__()
        self.W_query, self.W_key, self.W_value, self.out_proj = mha.W_query, mha.W_key, mha.W_value, mha.out_proj
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: Tensor, kv_cache: object = None, rope: object = None) -> Tensor:
        b, t, c = x.shape
        # (B, T, C) -> (B, H, T, D)
        q = self.W_query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(2, 3)  # (B, H, T, T)
        scores.masked_fill_(self.mask.bool()[:t, :t], -torch.inf)
        weights = torch.softmax(scores / self.head_dim**0.5, dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(b, t, c)  # (B, H, T, D) -> (B, T, C)
        return self.out_proj(context)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One forward, backward and optimizer step."""
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def generation_table(repeat: int) -> list[str]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, context_length=512)).eval()
    rows = [
        "| context | no cache tok/s | KV cache tok/s | speed-up |",
        "|---|---|---|---|",
    ]
    for length in (64, 256, 512):
        prompt = torch.randint(65, (1, length - NEW_TOKENS), generator=torch.Generator().manual_seed(1))
        seconds = {}
        for cache in (False, True):
            run = partial(generate, model, prompt, NEW_TOKENS, temperature=0.0, use_cache=cache)
            seconds[cache] = median_seconds(run, repeat)
        cached_tokens = generate(model, prompt, NEW_TOKENS, temperature=0.0, use_cache=True)
        plain_tokens = generate(model, prompt, NEW_TOKENS, temperature=0.0, use_cache=False)
        assert torch.equal(cached_tokens, plain_tokens), "cached and uncached greedy tokens differ"
        plain, cached = NEW_TOKENS / seconds[False], NEW_TOKENS / seconds[True]
        rows.append(f"| {length} | {plain:,.0f} | {cached:,.0f} | {cached / plain:.1f}x |")
    return rows


def training_table(repeat: int) -> list[str]:
    rows = ["| context | batch | ours tok/s | book tok/s | ours / book |", "|---|---|---|---|---|"]
    for context, batch in ((64, 12), (256, 12)):
        x, y = torch.randint(65, (2, batch, context), generator=torch.Generator().manual_seed(2))
        speeds, logits = {}, {}
        for name in ("ours", "book"):
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=65, context_length=context))
            if name == "book":
                for block in model.blocks:
                    block.attn = BookAttention(block.attn, context)
            logits[name] = model(x)[0].detach()
            optimizer = make_optimizer(model, TrainConfig())
            speeds[name] = batch * context / median_seconds(partial(train_step, model, optimizer, x, y), repeat)
        torch.testing.assert_close(logits["book"], logits["ours"])  # the same function, written two ways
        ratio = speeds["ours"] / speeds["book"]
        rows.append(f"| {context} | {batch} | {speeds['ours']:,.0f} | {speeds['book']:,.0f} | {ratio:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per cell (default: 5)")
    parser.add_argument("--markdown", help="also write the tables to this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {NEW_TOKENS} new tokens"
    text = "\n".join(
        [
            header,
            "",
            "Generation (greedy, batch 1):",
            *generation_table(args.repeat),
            "",
            "Training step (forward + backward + AdamW):",
            *training_table(args.repeat),
        ]
    )
    print(text)
    if args.markdown:
        from selfattention.files import write_text

        write_text(args.markdown, text + "\n")


if __name__ == "__main__":
    main()
