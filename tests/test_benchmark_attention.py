"""``benchmarks/attention.py`` compares like with like: every column computes the same attention."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("benchmark_attention", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["causal", "sliding_window(256)", "documents(16)", "padding(S/2)"])
def test_flex_column_masks_are_the_descriptions(bench, kind):  # type: ignore[no-untyped-def]
    """The FlexAttention column's own mask_mods allow exactly what our descriptions allow."""
    length = 640
    mod = bench.flex_mask_mod(kind, length, torch.device("cpu"))
    want = bench.description(kind, length).materialize(1, 1, length, length)
    assert torch.equal(create_mask(mod, 1, 1, length, length, device="cpu"), want.expand(1, 1, length, length))


@pytest.mark.parametrize("kind", ["dense", "causal", "documents(16)"])
def test_every_other_column_computes_the_same_attention(bench, kind):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 320, bench.D, generator=gen) for _ in range(3))
    impls = {*bench.IMPLS.get(kind, bench.MASKED_IMPLS)} - {"flex"}  # compiled: see tests/backends/test_flex.py
    outputs = {impl: bench.call(impl, kind, q, k, v)() for impl in impls}
    for impl, out in outputs.items():
        torch.testing.assert_close(out, outputs["book"], atol=2e-5, rtol=1e-4, msg=impl)


def test_cases_leave_flex_forward_only_on_the_cpu(bench):  # type: ignore[no-untyped-def]
    args = bench.argparse.Namespace(
        quick=True, lengths=[1024], masks=bench.MASKS, impls=["flex", "auto"], book_max=4096, long=False,
        device="cpu", dtype="float32", heads=1,
    )  # fmt: skip
    cases = bench.cases(args)
    assert {case["impl"] for case in cases} == {"flex", "auto"}
    assert all(case.get("backward", True) is (case["impl"] != "flex") for case in cases)
