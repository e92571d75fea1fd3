"""The benchmark's four modules compute the same thing, so its table compares like with like."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "mha.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_mha", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_four_modules_agree_forward_and_backward():
    bench = load_benchmark()
    modules = bench.build(width=24, tokens=10, heads=3)
    assert list(modules) == ["book-style", "SDPA-based", "ours", "nn.MultiheadAttention"]
    x = torch.randn(2, 10, 24)
    bench.check_agree(modules, x)  # raises on disagreement
    grads = {}
    for name, module in modules.items():
        x_grad = x.clone().requires_grad_(True)
        bench.forward_backward(module.train(), x_grad)()
        grads[name] = x_grad.grad
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads["book-style"], atol=1e-5, rtol=1e-4, msg=name)
