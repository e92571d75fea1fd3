"""GGUF loading on tiny files written by the ``gguf`` package: weights, permutation, types, and bad files.

The reference is transformers' ``LlamaForCausalLM`` built from the same weights in Hugging Face's layout
(before llama.cpp's permutation and quantization), so that the row permutation, the tied head and the
whole forward pass are checked against an outside implementation for every storage type.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_files import TINY, byte_alphabet, llama_cpp_permute, tiny_weights, write_tiny_gguf
from selfattention.loaders.gguf import SUPPORTED_TYPES, load_gguf, unpermute
from selfattention.loaders.gguf_tokenizer import build_tokenizer

gguf = pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")

pytestmark = pytest.mark.usefixtures("one_thread")


def stored(weights: dict[str, np.ndarray], qtype: str) -> dict[str, torch.Tensor]:
    """The weights as the file stores them, decoded: quantization acts on rows, so permuting commutes with it."""
    kind = gguf.GGMLQuantizationType[qtype]
    out = {}
    for name, value in weights.items():
        if value.ndim == 2 and qtype == "F16":
            value = value.astype(np.float16).astype(np.float32)
        elif value.ndim == 2 and qtype != "F32":
            value = gguf.quants.dequantize(gguf.quants.quantize(value, kind), kind)
        out[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out


def reference_model(weights: dict[str, torch.Tensor], tied: bool, **rope: object):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is not installed")
    config = transformers.LlamaConfig(
        **rope,
        vocab_size=TINY["vocab"],
        hidden_size=TINY["width"],
        intermediate_size=TINY["hidden"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        max_position_embeddings=TINY["context"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    if tied:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    model.load_state_dict({k: v for k, v in weights.items() if k != "rope_freqs.weight"}, strict=True)
    return model


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_file_gives_the_logits_of_transformers(tmp_path: Path, qtype: str, tied: bool) -> None:
    weights = tiny_weights(tied=tied)
    lm = load_gguf(write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", weights, qtype=qtype))
    reference = reference_model(stored(weights, qtype), tied)
    assert lm.model.config.tie_embeddings is tied
    assert (lm.model.out_head.weight is lm.model.tok_emb.weight) is tied
    ids = torch.tensor([[5, 17, 200, 3, 99, 42, 7], [8, 250, 1, 1, 64, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)[0]
        theirs = reference(input_ids=ids, attention_mask=mask.long()).logits
    # float32, the same operations in another order; measured differences are about 1e-6
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=0)


LLAMA31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 28,
}
"""Llama 3.1's RoPE scaling, its lengths shrunk to the tiny model's context of 32 (the same shape of curve)."""


def llama31_factors(head_dim: int, base: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> np.ndarray:  # fmt: skip
    """The factors llama.cpp's converter stores as ``rope_freqs.weight`` for Llama 3.1's published rule:
    1 for wavelengths under ``original / high_freq_factor``, ``factor`` over ``original / low_freq_factor``,
    and in between the inverse of a linear blend of ``1 / factor`` and 1."""
    frequencies = base ** -(np.arange(0, head_dim, 2) / head_dim)
    out = []
    for wavelength in 2 * math.pi / frequencies:
        if wavelength < original_max_position_embeddings / high_freq_factor:
            out.append(1.0)
        elif wavelength > original_max_position_embeddings / low_freq_factor:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_rope_factors_give_the_logits_of_transformers_llama31_scaling(tmp_path: Path) -> None:
    """llama.cpp stores Llama 3.1's RoPE scaling as a tensor, with no ``rope.scaling.type`` key beside it."""
    head_dim = TINY["width"] // TINY["heads"]
    factors = llama31_factors(head_dim, 10000.0, **LLAMA31_SCALING)
    # the three cases, each present: 1; 1 / ((1 - s) / 8 + s) with s = (28 / 19.87 - 1) / 3 = 0.136; 8
    assert sorted(set(np.round(factors, 3))) == [1.0, 4.092, 8.0]
    weights = {**tiny_weights(), "rope_freqs.weight": factors}
    lm = load_gguf(write_tiny_gguf(tmp_path / "llama31.gguf", weights))
    plain = load_gguf(write_tiny_gguf(tmp_path / "plain.gguf", tiny_weights()))
    assert lm.model.config.rope_factors == tuple(factors.tolist())
    scaled = reference_model(stored(weights, "F32"), True, rope_scaling={"rope_type": "llama3", **LLAMA31_SCALING})
    ids = torch.arange(TINY["context"]).view(1, -1) * 7 % TINY["vocab"]
    with torch.no_grad():
        ours, theirs, unscaled = lm.model(ids)[0], scaled(input_ids=ids).logits, plain.model(ids)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # as the unscaled comparison above
    assert (unscaled - theirs).abs().max() > 0.1  # the factors matter at these positions


@pytest.mark.parametrize(
    ("factors", "message"),
    [
        (np.ones(3, np.float32), r"rope_factors must hold D / 2 = 8 numbers, got 3"),
        (
            np.array([1, 1, 0, 1, 1, 1, 1, 1], np.float32),
            r"rope_factors must be finite and positive, got 0.0 at index 2",
        ),
    ],
)
def test_bad_rope_factors_are_named(tmp_path: Path, factors: np.ndarray, message: str) -> None:
    path = write_tiny_gguf(tmp_path / "bad.gguf", {**tiny_weights(), "rope_freqs.weight": factors})
    with pytest.raises(ValueError, match=rf"bad.gguf: rope_freqs.weight: {message}$"):
        load_gguf(path)


def tokenizer_metadata(pre: str, **more: object) -> dict[str, object]:
    """A vocabulary that holds "abc" whole although the merges build only "ab"; BOS is id 256."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [*byte_alphabet(), "<|begin_of_text|>", "ab", "abc"],
        "tokenizer.ggml.token_type": [1] * 256 + [3, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 256,
        **more,
    }


@pytest.mark.parametrize("pre", ["llama-bpe", "llama3"])
def test_llama3_tokenizers_take_whole_words_and_add_bos_as_llama_cpp_does(pre: str) -> None:
    """llama.cpp (and Hugging Face's Llama 3 ``tokenizer.json``, ``ignore_merges``) takes a word the vocabulary
    holds as one token whatever the merges say, and starts with BOS unless the file clears it."""
    assert build_tokenizer(tokenizer_metadata(pre)).encode("abc").ids == [256, 258]
    assert build_tokenizer(tokenizer_metadata(pre, **{"tokenizer.ggml.add_bos_token": False})).encode("abc").ids == [
        258
    ]
    # GPT-2's names keep the merges (SmolLM2's files among them) and add no BOS unless asked: "ab" then "c"
    assert build_tokenizer(tokenizer_metadata("default")).encode("abc").ids == [257, ord("c")]


def test_quantized_weights_stay_near_the_originals(tmp_path: Path) -> None:
    weights = tiny_weights()
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    for qtype, tolerance in (("Q8_0", 0.01), ("Q4_1", 0.15), ("Q4_0", 0.15)):
        lm = load_gguf(write_tiny_gguf(tmp_path / f"{qtype}.gguf", weights, qtype=qtype))
        ours = lm.model.blocks[0].attn.W_query.weight.detach().numpy()
        assert np.abs(ours - q).max() < tolerance * np.abs(q).max(), qtype


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = torch.from_numpy(llama_cpp_permute(weight, heads))
        assert not torch.equal(permuted, torch.from_numpy(weight))
        assert torch.equal(unpermute(permuted, heads), torch.from_numpy(weight))


def test_metadata_becomes_the_config(tmp_path: Path) -> None:
    lm = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights()))
    config = lm.model.config
    assert (config.vocab_size, config.emb_dim, config.num_layers) == (TINY["vocab"], TINY["width"], TINY["layers"])
    assert (config.num_heads, config.num_kv_heads, config.hidden_dim) == (TINY["heads"], TINY["kv_heads"], 96)
    assert (config.context_length, config.rope_base) == (TINY["context"], 10000.0)
    assert lm.name == "tiny test llama"
    assert lm.eos_token_id == 256
    assert lm.model.blocks[1].attn.num_kv_heads == TINY["kv_heads"]


def test_token_labels_show_every_kind_of_whitespace(tmp_path: Path) -> None:
    """As on every page of the viewer: a raw tab broke the columns of the tables that print these labels."""
    lm = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights()))
    labels = lm.tokens(lm.encode("a\tb the\n"))
    assert "".join(labels) == "a⇥b␣the⏎"
    assert not any(character.isspace() for label in labels for character in label)


def test_supported_types_are_the_promised_ones() -> None:
    assert {"F32", "F16", "Q8_0", "Q4_0", "Q4_1"} <= set(SUPPORTED_TYPES)


# ---- bad files: each a ValueError of one line that names the problem ----


def test_another_architecture_is_named(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_weights(), arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture is 'gpt2'; only llama"):
        load_gguf(path)


def test_unsupported_quantization_is_named(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "iq4.gguf", tiny_weights(), qtype="IQ4_NL")
    with pytest.raises(ValueError, match=r"tensor '.*' has type IQ4_NL, which this loader does not dequantize"):
        load_gguf(path)


def test_sentencepiece_tokenizer_is_refused_by_name(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "spm.gguf", tiny_weights(), tokenizer="llama")
    with pytest.raises(ValueError, match=r"tokenizer model is 'llama'; only byte-level BPE \('gpt2'\)"):
        load_gguf(path)


def test_rope_scaling_is_refused(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "scaled.gguf", tiny_weights(), metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match=r"RoPE scaling 'yarn' is not implemented"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match=r"is not a GGUF file \(it starts with b'PK"):
        load_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_gguf(empty)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights(), qtype="Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ValueError, match="is truncated"):
        load_gguf(path)
