"""Ring attention (selfattention.distributed) against single-process attention, in 2 and 4 real processes."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from selfattention import attention, masks
from selfattention.distributed import gather_sequence, ring_attention, sequence_segments, shard_sequence
from selfattention.launch import LaunchError, run_local

# float32 tolerances of the specification. The ring adds the keys' contributions in another order than
# one softmax over the whole row (a log-sum-exp merge per block), so results differ from the reference by
# rounding only: a few float32 ulps of values of order 1, far inside 1e-5 (outputs) and 1e-4 (gradients).
OUT_TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}


def _inputs(length: int, heads: int = 2, kv_heads: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, 8, generator=g)
    k = torch.randn(2, kv_heads, length, 8, generator=g)
    v = torch.randn(2, kv_heads, length, 6, generator=g)
    grad_out = torch.randn(2, heads, length, 6, generator=g)
    return q, k, v, grad_out


def _alibi(score, b, h, q_idx, kv_idx):
    return score - 0.5 * (h + 1) * (q_idx - kv_idx)


def _alibi_bias(length: int, heads: int) -> torch.Tensor:
    """The float mask that adds what :func:`_alibi` subtracts, ``(H, L, L)``."""
    distance = torch.arange(length).unsqueeze(-1) - torch.arange(length)
    return -0.5 * torch.arange(1, heads + 1).view(-1, 1, 1) * distance


EXTRAS = {  # name -> (ring_attention keywords, attention keywords of the single-process reference)
    "none": lambda length: ({}, {}),
    "window": lambda length: ({"mask": masks.sliding_window(3)}, {"mask": masks.sliding_window(3)}),
    "documents": lambda length: (
        {"mask": masks.documents([[i * 3 // length for i in range(length)]] * 2)},
        {"mask": masks.documents([[i * 3 // length for i in range(length)]] * 2)},
    ),
    "alibi": lambda length: ({"score_mod": _alibi}, {"mask": _alibi_bias(length, 2)}),
}


def _ring_run(length, causal, layout, lengths, kv_heads, extra="none"):
    """On every rank: cut the same seeded inputs, run the ring forward and backward, gather the results."""
    q, k, v, grad_out = _inputs(length, kv_heads=kv_heads)
    if lengths is None:
        pieces = [shard_sequence(t, layout=layout) for t in (q, k, v, grad_out)]  # type: ignore[arg-type]
    else:  # arbitrary contiguous slices, e.g. [5, 1, 3, 7]
        start = sum(lengths[: dist.get_rank()])
        pieces = [t[..., start : start + lengths[dist.get_rank()], :] for t in (q, k, v, grad_out)]
    q_local, k_local, v_local = (p.clone().requires_grad_() for p in pieces[:3])
    options = EXTRAS[extra](length)[0]
    out = ring_attention(q_local, k_local, v_local, causal=causal, layout=layout, **options)
    out.backward(pieces[3])
    return [gather_sequence(t, layout=layout) for t in (out, q_local.grad, k_local.grad, v_local.grad)]  # type: ignore[arg-type]


CASES = [
    # world size, total length, causal, layout, explicit slice lengths, key/value heads, mask or score_mod
    pytest.param(2, 16, False, "contiguous", None, 2, "none", id="2ranks-even"),
    pytest.param(2, 13, True, "contiguous", None, 2, "none", id="2ranks-causal-uneven"),
    pytest.param(2, 16, True, "zigzag", None, 2, "none", id="2ranks-causal-zigzag"),
    pytest.param(4, 10, False, "contiguous", None, 2, "none", id="4ranks-uneven"),
    pytest.param(4, 16, True, "contiguous", [5, 1, 3, 7], 2, "none", id="4ranks-causal-any-lengths"),
    pytest.param(4, 19, True, "zigzag", None, 2, "none", id="4ranks-causal-zigzag-uneven"),
    pytest.param(4, 12, False, "zigzag", None, 1, "none", id="4ranks-zigzag-grouped-heads"),
    pytest.param(4, 17, True, "zigzag", None, 2, "window", id="4ranks-causal-sliding-window"),
    pytest.param(2, 15, False, "zigzag", None, 2, "documents", id="2ranks-documents"),
    pytest.param(2, 14, True, "zigzag", None, 2, "alibi", id="2ranks-causal-alibi-score-mod"),
]


@pytest.mark.parametrize(("world_size", "length", "causal", "layout", "lengths", "kv_heads", "extra"), CASES)
def test_ring_attention_matches_single_process(world_size, length, causal, layout, lengths, kv_heads, extra):
    q, k, v, grad_out = _inputs(length, kv_heads=kv_heads)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    expected = attention(q, k, v, causal=causal, backend="math", **EXTRAS[extra](length)[1])
    expected.backward(grad_out)

    args = (length, causal, layout, lengths, kv_heads, extra)
    results = run_local(_ring_run, world_size, *args, timeout=60)

    out, dq, dk, dv = results[0]
    torch.testing.assert_close(out, expected.detach(), **OUT_TOL)
    torch.testing.assert_close(dq, q.grad, **GRAD_TOL)
    torch.testing.assert_close(dk, k.grad, **GRAD_TOL)
    torch.testing.assert_close(dv, v.grad, **GRAD_TOL)
    for rank, other in enumerate(results[1:], start=1):  # every rank gathered the same whole sequence
        for mine, theirs in zip(results[0], other, strict=True):
            torch.testing.assert_close(theirs, mine, atol=0, rtol=0, msg=f"rank {rank} disagrees")


def _two_rings_of_two():
    """Ranks {0, 1} and {2, 3} run separate rings on different sequences (e.g. beside data parallelism)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    pair = dist.get_rank() // 2
    q, k, v, _ = _inputs(11, seed=pair)
    pieces = [shard_sequence(t, layout="zigzag", group=groups[pair]) for t in (q, k, v)]
    out = ring_attention(*pieces, causal=True, layout="zigzag", group=groups[pair])
    return pair, gather_sequence(out, layout="zigzag", group=groups[pair])


def test_rings_on_subgroups():
    for pair, out in run_local(_two_rings_of_two, 4):
        q, k, v, _ = _inputs(11, seed=pair)
        torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="math"), **OUT_TOL)


def _bfloat16_ring():
    q, k, v, grad_out = (t.to(torch.bfloat16) for t in _inputs(12))
    pieces = [shard_sequence(t, layout="zigzag").requires_grad_() for t in (q, k, v)]
    out = ring_attention(*pieces, causal=True, layout="zigzag")
    out.backward(shard_sequence(grad_out, layout="zigzag"))
    return [gather_sequence(t, layout="zigzag") for t in (out, *(p.grad for p in pieces))]


def test_bfloat16_keeps_its_dtype_and_matches_float32_to_bfloat16_precision():
    q, k, v, grad_out = (t.to(torch.bfloat16).float() for t in _inputs(12))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    expected = attention(q, k, v, causal=True, backend="math")
    expected.backward(grad_out)
    results = run_local(_bfloat16_ring, 2)[0]
    assert [t.dtype for t in results] == [torch.bfloat16] * 4
    # Blocks are computed and merged in float32; only the inputs, the output and the gradients are rounded
    # to bfloat16 (8 significant bits: relative error up to 2**-8 per rounding), hence 2e-2.
    for got, want in zip(results, (expected, q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got.float(), want.detach(), atol=2e-2, rtol=2e-2)


def test_one_process_is_plain_attention():
    q, k, v, _ = _inputs(7)
    (out,) = run_local(_one_rank, 1, q, k, v)
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="math"), **OUT_TOL)


def _one_rank(q, k, v):
    return ring_attention(q, k, v, causal=True)


# --- layouts, without processes ---


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("length", "world_size"), [(8, 2), (11, 4), (9, 1), (16, 4)])
def test_shards_cover_the_sequence_once_in_their_segments(layout, length, world_size):
    x = torch.arange(length).view(1, length, 1)
    shards = [shard_sequence(x, layout=layout, rank=r, world_size=world_size).flatten() for r in range(world_size)]
    segments = sequence_segments([len(s) for s in shards], layout)
    for shard, segs in zip(shards, segments, strict=True):
        assert shard.tolist() == [i for start, stop in segs for i in range(start, stop)]
    assert sorted(torch.cat(shards).tolist()) == list(range(length))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= (2 if layout == "zigzag" else 1)


def test_zigzag_pairs_early_and_late_chunks():
    assert sequence_segments([4, 4, 4, 4], "zigzag") == [
        ((0, 2), (14, 16)),
        ((2, 4), (12, 14)),
        ((4, 6), (10, 12)),
        ((6, 8), (8, 10)),
    ]


@pytest.mark.parametrize(
    ("lengths", "layout", "message"),
    [
        ([3, 0], "contiguous", r"at least one token; slice lengths are \[3, 0\]"),
        ([5, 3], "zigzag", r"needs slice lengths \[4, 4\], got \[5, 3\]"),
        ([2, 2], "ring", r"unknown layout 'ring'"),
    ],
)
def test_bad_slices_are_named(lengths, layout, message):
    with pytest.raises(ValueError, match=message):
        sequence_segments(lengths, layout)


def test_mask_tensors_are_refused_before_any_communication():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match=r"takes a mask description from selfattention\.masks, got Tensor"):
        ring_attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.bool))  # type: ignore[arg-type]


def test_queries_and_keys_must_be_the_same_tokens():
    with pytest.raises(ValueError, match="got 4 queries and 5 keys on this rank"):
        ring_attention(torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))


def test_rank_outside_the_world():
    with pytest.raises(ValueError, match=r"rank \(2\) must be in \[0, world_size\) = \[0, 2\)"):
        shard_sequence(torch.zeros(1, 8, 2), rank=2, world_size=2)


def test_too_short_to_shard():
    with pytest.raises(ValueError, match="3 tokens cannot be cut into 4 non-empty zigzag pieces for 2 ranks"):
        shard_sequence(torch.zeros(1, 3, 2), layout="zigzag", rank=0, world_size=2)


# --- failures end every rank instead of hanging ---


def _mismatched_heads():
    heads = 2 + dist.get_rank()  # rank 1 has a different number of heads
    q = torch.randn(1, heads, 4, 8)
    return ring_attention(q, q, q)


def test_shapes_that_disagree_across_ranks_fail_on_every_rank():
    with pytest.raises(LaunchError, match="same shapes on every rank"):
        run_local(_mismatched_heads, 2, timeout=60)


def _fails_on_every_rank(expected: str, fn, *args) -> str:  # type: ignore[no-untyped-def]
    """Run ``fn(*args)`` on two ranks; assert that each failed with ``expected`` at the start of its error;
    return the launcher's whole message."""
    with pytest.raises(LaunchError) as error:
        run_local(fn, 2, *args, timeout=60)
    for rank in (0, 1):
        assert f"rank {rank} failed: {expected}" in str(error.value)
    return str(error.value)


SETTINGS_DIFFER = "ValueError: ring attention needs the same call settings on every rank: "


DIFFERENT_SETTINGS = {  # name -> ring_attention keywords of rank r
    "causal": lambda r: {"causal": r == 0},
    "scale": lambda r: {"scale": 0.3 if r == 0 else None},
    "layout": lambda r: {"layout": "zigzag" if r == 0 else "contiguous"},
    "mask": lambda r: {"mask": masks.sliding_window(2 + r)},
    "score_mod": lambda r: {"score_mod": _alibi if r == 0 else None},
}


def _different_settings(name: str):
    q = torch.randn(1, 2, 4, 8)
    return ring_attention(q, q, q, **DIFFERENT_SETTINGS[name](dist.get_rank()))


@pytest.mark.parametrize("name", list(DIFFERENT_SETTINGS))
def test_call_settings_that_disagree_across_ranks_fail_on_every_rank(name):
    message = _fails_on_every_rank(SETTINGS_DIFFER, _different_settings, name)
    for rank, other in ((0, 1), (1, 0)):
        assert f"rank {rank} failed: {SETTINGS_DIFFER}rank {rank} has {name}=" in message
        assert f"rank {other} has {name}=" in message


def _scaled(factor: float):
    return lambda score, b, h, q_idx, kv_idx: score * factor  # one factory: one name, other captured values


SAME_LOOKING = {  # case -> (the setting that differs, ring_attention keywords of rank r)
    "documents with other ids": ("mask", lambda r: {"mask": masks.documents([0] * 8 if r == 0 else [0] * 4 + [1] * 4)}),
    "two lambda rules": (
        "mask",
        lambda r: {
            "mask": masks.from_function((lambda b, h, q, kv: q >= kv) if r == 0 else (lambda b, h, q, kv: q <= kv))
        },
    ),
    "score_mods of one factory": ("score_mod", lambda r: {"score_mod": _scaled(1.0 + r)}),
}


def _same_looking(case: str):
    q = torch.randn(1, 2, 4, 8)
    return ring_attention(q, q, q, **SAME_LOOKING[case][1](dist.get_rank()))


def _different_inputs(setting: str):
    rank = dist.get_rank()
    q = torch.randn(1, 2, 4, 8, requires_grad=setting != "requires_grad" or rank == 0)
    kv = torch.randn(1, 1 if setting == "kv_heads" and rank == 0 else 2, 4, 8)
    return ring_attention(q, kv, kv)


@pytest.mark.parametrize(
    ("run", "argument", "setting"),
    [(_same_looking, case, setting) for case, (setting, _) in SAME_LOOKING.items()]
    + [(_different_inputs, name, name) for name in ("kv_heads", "requires_grad")],
    ids=[*SAME_LOOKING, "kv heads before expansion", "requires_grad"],
)
def test_settings_that_print_alike_but_differ_fail_on_every_rank(run, argument: str, setting: str):
    """Document ids of one shape, lambdas (all named <lambda>), closures of one factory: compared by content
    (a checksum of the ids, of the code and captured values); and what a rank's inputs imply."""
    message = _fails_on_every_rank(SETTINGS_DIFFER, run, argument)
    for rank in (0, 1):
        assert f"rank {rank} has {setting}=" in message


def _gather_with_other_layouts():
    x = torch.randn(1, 2, 4, 8)
    return gather_sequence(x, layout="zigzag" if dist.get_rank() == 0 else "contiguous")


def test_gathering_with_layouts_that_disagree_fails_on_every_rank():
    expected = "ValueError: gather_sequence needs one layout on every rank, got ['zigzag', 'contiguous'] (by rank)"
    _fails_on_every_rank(expected, _gather_with_other_layouts)


def _uneven_zigzag():
    q = torch.randn(1, 2, 5 if dist.get_rank() == 0 else 3, 8)  # not the zigzag cut of 8 tokens
    return ring_attention(q, q, q, causal=True, layout="zigzag")


def test_slices_that_do_not_fit_the_layout_fail_on_every_rank():
    _fails_on_every_rank(
        "ValueError: zigzag layout of 8 tokens over 2 ranks needs slice lengths [4, 4], got [5, 3]", _uneven_zigzag
    )


def _rank_one_fails():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 gives up")
    q = torch.randn(1, 2, 4, 8)
    return ring_attention(q, q, q)  # rank 0 waits here for rank 1


def test_a_failing_rank_ends_the_others():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 gives up"):
        run_local(_rank_one_fails, 2, timeout=60, op_timeout=30)
    assert time.monotonic() - start < 20  # ended by the launcher, not by the 30 s operation timeout


def _rank_one_hangs():
    if dist.get_rank() == 1:
        time.sleep(60)
    q = torch.randn(1, 2, 4, 8)
    return ring_attention(q, q, q)


def test_a_hanging_rank_times_out():
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 0 failed: .*Timed out"):
        run_local(_rank_one_hangs, 2, timeout=60, op_timeout=2)  # rank 0 gives up waiting after 2 s
    assert time.monotonic() - start < 30  # ended by rank 0's timeout, not by rank 1's 60 s sleep


def test_example_script_matches_single_process(monkeypatch, capsys):
    # main() as `python examples/ring_attention.py ...` runs it, in this process (saves a fresh interpreter).
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    monkeypatch.delenv("RANK", raising=False)
    argv = ["ring_attention.py", "--processes", "2", "--length", "37", "--causal", "--layout", "zigzag"]
    monkeypatch.setattr(sys, "argv", argv)
    importlib.import_module("ring_attention").main()
    printed = capsys.readouterr().out
    assert "2 processes, 37 tokens, causal=True, layout=zigzag" in printed
    assert "tokens on rank 0: 19" in printed
    differences = [float(line.rsplit(":", 1)[1]) for line in printed.splitlines() if "single process" in line]
    assert len(differences) == 4 and max(differences) < 1e-5, printed


def test_docstring_examples():
    import doctest

    from selfattention import distributed

    result = doctest.testmod(distributed)
    assert result.attempted >= 3 and result.failed == 0


# --- MultiHeadAttention with context_parallel ---


def _module(causal=True, context_parallel=None):
    from selfattention.modules import MultiHeadAttention

    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return MultiHeadAttention(8, 8, None, 0.0, 2, num_kv_heads=1, causal=causal, context_parallel=context_parallel)


def _module_inputs(length: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, length, 8, generator=g), torch.randn(2, length, 8, generator=g)


def _context_parallel_module(length: int, layout: str, causal: bool):
    from selfattention.distributed import ContextParallel

    module = _module(causal, ContextParallel(layout=layout))  # type: ignore[arg-type]
    x, grad_out = _module_inputs(length)
    x_local = shard_sequence(x, layout=layout, dim=1).clone().requires_grad_()  # type: ignore[arg-type]
    out = module(x_local)
    out.backward(shard_sequence(grad_out, layout=layout, dim=1))  # type: ignore[arg-type]
    grads = {name: p.grad for name, p in module.named_parameters()}
    for grad in grads.values():  # each rank's weight gradient covers its own tokens: sum them
        dist.all_reduce(grad)
    gathered = [gather_sequence(t, layout=layout, dim=1) for t in (out, x_local.grad)]  # type: ignore[arg-type]
    return gathered, grads


@pytest.mark.parametrize(("world_size", "layout", "causal"), [(2, "zigzag", True), (4, "contiguous", False)])
def test_multi_head_attention_with_context_parallel_matches_one_process(world_size, layout, causal):
    module = _module(causal)
    x, grad_out = _module_inputs(13)
    x.requires_grad_()
    expected = module(x)
    expected.backward(grad_out)

    (out, dx), grads = run_local(_context_parallel_module, world_size, 13, layout, causal)[0]

    torch.testing.assert_close(out, expected.detach(), **OUT_TOL)
    torch.testing.assert_close(dx, x.grad, **GRAD_TOL)
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, **GRAD_TOL, msg=f"gradient of {name}")


def test_context_parallel_refuses_what_ring_attention_cannot_do():
    from selfattention.distributed import ContextParallel

    module = _module(context_parallel=ContextParallel())
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="context_parallel does not support key_padding_mask"):
        module(x, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="context_parallel does not support kv_cache"):
        module(x, kv_cache=module.make_kv_cache(1, 8))
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        ContextParallel(layout="ring")  # type: ignore[arg-type]
