"""The GPU path of ``"blocksparse"`` (FlexAttention), checked on the CPU: mask_mods, block masks, values.

FlexAttention has no backward on the CPU and the library sends it only CUDA inputs, so what is tested here
is everything but the device: each mask description's ``mask_mod`` against the description's own dense
mask, the block mask against the tile classification, and FlexAttention's forward with that block mask
(its eager reference, and once compiled) against the float64 reference. ``tests/test_cuda.py`` runs the
real thing on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from conftest import reference_attention
from selfattention import attention, masks
from selfattention.backends import flex
from selfattention.backends.tiles import Tiles
from selfattention.masks import FULL, PARTIAL

IDS = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
RULES = {
    "causal": masks.causal(),
    "top_left": masks.causal(align="top_left"),
    "window": masks.sliding_window(3),
    "padding": masks.padding([3, 11]),
    "padding one row": masks.padding([5]),
    "padding zero": masks.padding([0, 4]),
    "documents": masks.documents(IDS),
    "documents per row": masks.documents([IDS, [0] * 5 + [1] * 6]),
    "prefix": masks.prefix_lm(4),
    "docs & causal": masks.documents(IDS) & masks.causal(),
    "window | padding": masks.sliding_window(2) | masks.padding([6, 1]),
    "function": masks.from_function(lambda b, h, q, kv: (q - kv).abs() <= h + b),
}


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(("t", "s"), [(11, 11), (4, 11), (11, 7)])
def test_mask_mod_builds_the_description_s_own_mask(name, t, s):
    """FlexAttention's dense evaluation of the mask_mod equals ``materialize`` at every (b, h, q, kv)."""
    rule = RULES[name]
    try:
        want = rule.materialize(2, 3, t, s).expand(2, 3, t, s)
    except ValueError:  # documents need T <= S and S ids; padding lengths <= S
        pytest.skip(f"{name} does not fit T={t}, S={s}")
    got = create_mask(rule.mask_mod(t, s), 2, 3, t, s, device="cpu")
    assert torch.equal(got, want)


def test_mask_mod_numbers_are_captured_tensors_on_the_device():
    """Offsets and sizes are tensors (inputs of one compiled kernel), so a new window size does not recompile."""
    rule = masks.sliding_window(3).mask_mod(5, 5, device="meta")
    captured = [cell.cell_contents for cell in rule.__closure__ or ()]
    assert captured and all(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in captured)


@pytest.mark.parametrize("name", ["causal", "window", "documents", "docs & causal", "padding"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_lists_the_tiles_of_the_classification(name, causal):
    q, k = torch.zeros(2, 1, 300, 16), torch.zeros(2, 1, 300, 16)
    rule = {"documents": masks.documents(torch.arange(300) // 70), "docs & causal": masks.documents(
        torch.arange(300) // 70) & masks.causal()}.get(name, RULES[name])  # fmt: skip
    if name == "padding":
        rule = masks.padding([100, 290])
    kinds = Tiles(q, k, mask=rule, causal=causal, block_q=flex.BLOCK, block_k=flex.BLOCK).kinds
    blocks = flex.block_mask(q, k, mask=rule, causal=causal)
    for row in range(kinds.shape[0]):
        partial = blocks.kv_indices[0, 0, row, : int(blocks.kv_num_blocks[0, 0, row])]
        assert blocks.full_kv_indices is not None and blocks.full_kv_num_blocks is not None
        full = blocks.full_kv_indices[0, 0, row, : int(blocks.full_kv_num_blocks[0, 0, row])]
        assert partial.tolist() == torch.nonzero(kinds[row] == PARTIAL).flatten().tolist()
        assert full.tolist() == torch.nonzero(kinds[row] == FULL).flatten().tolist()
    # what FlexAttention computes from it: FULL tiles all allowed, PARTIAL tiles the mask_mod, the rest nothing
    assert torch.equal(dense_from_block_mask(blocks, 2, 300, 300), reference_mask(rule, causal, 2, 300, 300))


def dense_from_block_mask(blocks, batch, t, s):
    """The (B, 1, T, S) mask a BlockMask stands for, read tile by tile from its lists."""
    size = flex.BLOCK
    evaluated = create_mask(blocks.mask_mod, batch, 1, t, s, device="cpu")
    out = torch.zeros(batch, 1, t, s, dtype=torch.bool)
    for row in range(blocks.kv_num_blocks.shape[-1]):
        rows = slice(row * size, (row + 1) * size)
        for col in blocks.kv_indices[0, 0, row, : int(blocks.kv_num_blocks[0, 0, row])].tolist():
            cols = slice(col * size, (col + 1) * size)
            out[..., rows, cols] = evaluated[..., rows, cols]
        for col in blocks.full_kv_indices[0, 0, row, : int(blocks.full_kv_num_blocks[0, 0, row])].tolist():
            out[..., rows, col * size : (col + 1) * size] = True
    return out


def reference_mask(rule, causal, batch, t, s):
    """The boolean (B, 1, T, S) mask of ``rule`` and the bottom-right causal rule, built densely."""
    want = torch.ones(batch, 1, t, s, dtype=torch.bool) if rule is None else rule.materialize(batch, 1, t, s)
    if causal:
        want = want & torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return want.expand(batch, 1, t, s)


FORWARD = {
    "none, causal": (None, True),
    "window": (masks.sliding_window(40), False),
    "documents": (masks.documents(torch.arange(300) * 5 // 300), False),
    "docs & causal": (masks.documents(torch.arange(300) * 5 // 300) & masks.causal(), False),
    "padding, some rows empty": (masks.padding([0, 250]), False),
    "prefix": (masks.prefix_lm(50), False),
    "window and causal flag": (masks.sliding_window(200), True),
}


@pytest.mark.parametrize("name", FORWARD)
def test_flex_forward_with_our_block_mask_matches_the_reference(name):
    """FlexAttention's eager reference run on our block mask and mask_mod, against float64 (float32 inputs)."""
    rule, causal = FORWARD[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 16, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = flex.flex_forward(q, k, v, scale=0.25, mask=rule, causal=causal, compiled=False)
    want, _ = reference_attention(q, k, v, mask=reference_mask(rule, causal, 2, 300, 300), scale=0.25)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_flex_forward_on_the_cpu_matches_the_reference():
    """The compiled kernel (C++ on the CPU, Triton on CUDA) with our block mask: one window, one padding."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 384, 16, generator=gen) for _ in range(3))
    for rule in (masks.sliding_window(100), masks.padding([0])):
        with torch.no_grad():
            out = flex.flex_forward(q, k, v, scale=0.25, mask=rule, causal=False, compiled=True)
        want, _ = reference_attention(q, k, v, mask=reference_mask(rule, False, 1, 384, 384), scale=0.25)
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_blocksparse_gpu_path_runs_flex_with_the_right_shapes(monkeypatch):
    """The CUDA branch of ``"blocksparse"`` on CPU tensors: flex.attention as it runs on a GPU, device aside.

    ``supported`` is forced true and the compiled kernel replaced by FlexAttention's eager reference, so
    that the reshapes to 4-D and back, the scale and the causal flag are those of a real CUDA call.
    """
    calls = []
    monkeypatch.setattr(flex, "supported", lambda q, k, v: True)
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: calls.append(1) or flex_attention)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 2, 300, 16, generator=gen)  # (B1, B2, H, T, D): leading dims are flattened
    k, v = torch.randn(2, 3, 2, 400, 16, generator=gen), torch.randn(2, 3, 2, 400, 32, generator=gen)
    rule = masks.sliding_window(64)
    with torch.no_grad():
        out, _ = flex.attention(q, k, v, mask=rule, causal=True, scale=0.3, dropout_p=0.0, return_weights=False)
    want = attention(q.double(), k.double(), v.double(), mask=rule, causal=True, scale=0.3, backend="math")
    assert out.shape == (2, 3, 2, 300, 32) and calls == [1]
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_what_the_compiled_kernel_cannot_take_goes_to_tiled():
    """CPU tensors, float64, narrow heads: ``flex.attention`` answers through ``"tiled"``, with gradients."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    assert not flex.supported(q, k, v)
    rule = masks.documents(torch.arange(300) // 70)
    out, _ = flex.attention(q, k, v, mask=rule, causal=True, scale=0.5, dropout_p=0.0, return_weights=False)
    want = attention(q, k, v, mask=rule, causal=True, scale=0.5, backend="math")
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(grads, torch.autograd.grad(want.sum(), (q, k, v)))


def test_small_calls_go_to_the_fused_kernel_with_their_mask(monkeypatch):
    """One decoding step (T = 1) compiles nothing: the description is materialised for SDPA."""
    monkeypatch.setattr(flex, "supported", lambda q, k, v: True)
    monkeypatch.setattr(flex, "flex_forward", lambda *a, **kw: pytest.fail("a small call reached FlexAttention"))
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 1, 16, generator=gen), torch.randn(2, 40, 16, generator=gen), torch.randn(2, 40, 16)
    rule = masks.sliding_window(8)
    out, _ = flex.attention(q, k, v, mask=rule, causal=True, scale=0.25, dropout_p=0.0, return_weights=False)
    want = attention(q.double(), k.double(), v.double(), mask=rule, causal=True, scale=0.25, backend="math")
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_a_tensor_mask_goes_to_the_fused_kernel():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen) for _ in range(3))
    mask = torch.rand(9, 9, generator=gen) > 0.5
    out, _ = flex.attention(q, k, v, mask=mask, causal=False, scale=0.25, dropout_p=0.0, return_weights=False)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask=mask, scale=0.25)[0], atol=2e-6,
                               rtol=1e-5)  # fmt: skip


def test_a_block_mask_is_made_once_per_description_shape_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path reuses the block mask of the same description (every layer of a model, every step of a
    loop); a new shape, causal flag or an in-place edit of the ids makes a new one, and the values follow."""
    made: list[int] = []
    build = flex.block_mask
    monkeypatch.setattr(flex, "block_mask", lambda *a, **kw: made.append(1) or build(*a, **kw))
    ids = torch.tensor([0] * 150 + [1] * 150)
    rule = masks.documents(ids) & masks.sliding_window(64)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=gen) for _ in range(3))

    def run(causal: bool = False) -> torch.Tensor:
        with torch.no_grad():
            return flex.flex_forward(q, k, v, scale=0.25, mask=rule, causal=causal, compiled=False)

    first = run()
    assert torch.equal(run(), first) and len(made) == 1  # the same call again: reused
    run(causal=True)
    flex.cached_block_mask(q[:, :, :200], k, mask=rule, causal=False)
    assert len(made) == 3  # another flag, another number of queries
    ids[100:] = 1  # the ids edited in place: the first document now ends at 100
    edited = run()
    assert len(made) == 4
    want, _ = reference_attention(q, k, v, mask=reference_mask(rule, False, 1, 300, 300), scale=0.25)
    torch.testing.assert_close(edited.double(), want, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(edited, first)


def test_function_rules_are_not_cached_and_entries_go_with_their_description(monkeypatch) -> None:
    made: list[int] = []
    build = flex.block_mask
    monkeypatch.setattr(flex, "block_mask", lambda *a, **kw: made.append(1) or build(*a, **kw))
    q = torch.zeros(1, 1, 256, 16)
    rule = masks.from_function(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)
    flex.cached_block_mask(q, q, mask=rule, causal=False)
    flex.cached_block_mask(q, q, mask=rule, causal=False)
    assert len(made) == 2  # what the function reads cannot be seen: made each time
    window = masks.sliding_window(8)
    for length in range(16, 16 * (flex.CACHED + 2), 16):  # more shapes than CACHED: the oldest go
        flex.cached_block_mask(q[:, :, :length], q[:, :, :length], mask=window, causal=False)
    assert len(flex._BLOCK_MASKS[window]) == flex.CACHED
    before = len(flex._BLOCK_MASKS)
    del window
    assert len(flex._BLOCK_MASKS) == before - 1
