"""Small GGUF files written with the ``gguf`` package's own writer: a tiny Llama in llama.cpp's layout."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
TINY = {"vocab": 259, "width": 64, "layers": 2, "heads": 4, "kv_heads": 2, "hidden": 96, "context": 32}


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values (written out here, independently of the library)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    spelling, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + shift)
            shift += 1
    return [spelling[b] for b in range(256)]


def tiny_weights(seed: int = 0, *, tied: bool = True) -> dict[str, np.ndarray]:
    """Random weights of a tiny Llama in Hugging Face's names and layout (``(out, in)``, halves RoPE)."""
    rng = np.random.default_rng(seed)
    w, h, g, f, v = TINY["width"], TINY["heads"], TINY["kv_heads"], TINY["hidden"], TINY["vocab"]
    d = w // h
    weights = {"model.embed_tokens.weight": rng.normal(0, 0.5, (v, w)), "model.norm.weight": 1 + rng.normal(0, 0.1, w)}
    if not tied:
        weights["lm_head.weight"] = rng.normal(0, 0.2, (v, w))
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + rng.normal(0, 0.1, w),
            p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (h * d, w)),
            p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (g * d, w)),
            p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (g * d, w)),
            p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (w, h * d)),
            p + "post_attention_layernorm.weight": 1 + rng.normal(0, 0.1, w),
            p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (f, w)),
            p + "mlp.up_proj.weight": rng.normal(0, 0.2, (f, w)),
            p + "mlp.down_proj.weight": rng.normal(0, 0.2, (w, f)),
        }
    return {name: value.astype(np.float32) for name, value in weights.items()}


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    if name == "rope_freqs.weight":  # llama.cpp's own tensor (Llama 3.1's RoPE factors), kept as it is
        return name
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if name in top:
        return top[name]
    if name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = name.split(".", 3)
    return f"blk.{index}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's two halves ``(2, D/2)`` interleaved into ``(D/2, 2)``."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(
    path: Path,
    weights: Mapping[str, np.ndarray],
    *,
    qtype: str = "F32",
    arch: str = "llama",
    tokenizer: str = "gpt2",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``weights`` (Hugging Face layout) as a llama.cpp GGUF file; matrices stored as ``qtype``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test llama")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["width"])
    writer.add_feed_forward_length(TINY["hidden"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*byte_alphabet(), "<|endoftext|>", "Ġt", "he"])
    writer.add_token_types([1] * 256 + [3, 1, 1])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_eos_token_id(256)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, value in weights.items():
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, TINY["kv_heads"])
        if value.ndim == 2 and gguf.GGML_QUANT_SIZES[kind][0] > 1 and qtype not in QUANTIZABLE:
            block, size = gguf.GGML_QUANT_SIZES[kind]  # a type gguf cannot write: zeros of the right size
            zeros = np.zeros((value.shape[0], value.shape[1] // block * size), np.uint8)
            writer.add_tensor(gguf_name(name), zeros, raw_dtype=kind)
        elif value.ndim == 1 or qtype == "F32":
            writer.add_tensor(gguf_name(name), value)
        elif qtype == "F16":
            writer.add_tensor(gguf_name(name), value.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(value, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
