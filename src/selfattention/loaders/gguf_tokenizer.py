"""A ``tokenizers.Tokenizer`` from the ``tokenizer.ggml.*`` metadata of a GGUF file.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, the GPT-2 family's scheme, used by SmolLM2 and Llama 3):
the vocabulary and merges come from the file, written in GPT-2's byte alphabet; the text is first split by
the pre-tokenizer the file names in ``tokenizer.ggml.pre``, with the rules llama.cpp applies for that name:

===============  =========================================================================================
``default``,     GPT-2's split (letters, numbers, punctuation runs, spaces)
``gpt2``
``smollm``       each digit on its own, then GPT-2's split (SmolLM2's own ``tokenizer.json`` says the same;
                 transformers' GGUF reader, which does not know the name, uses GPT-2's split alone and so
                 differs where two or more whitespace characters precede a digit)
``llama-bpe``    Llama 3's split: numbers in groups of up to three, case-insensitive contractions
===============  =========================================================================================

For Llama 3's names (``llama-bpe``, ``llama3``) llama.cpp also sets two rules that this module follows: a
word the vocabulary holds whole is one token even where the merges cannot build it (``ignore_merges``, as in
Hugging Face's Llama 3 ``tokenizer.json``), and the BOS token comes first unless the file says otherwise.

Tokens of type "control" (3) such as ``<|im_start|>`` are special tokens: they are matched whole in the text
and dropped by ``decode(..., skip_special_tokens=True)``; "user-defined" ones (4) are matched whole too.
When the file sets ``tokenizer.ggml.add_bos_token`` (or, for Llama 3's names, does not clear it), ``encode``
puts the BOS token first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2(pre: Any) -> list[Any]:
    return [pre.ByteLevel(add_prefix_space=False, use_regex=True)]


def _smollm(pre: Any) -> list[Any]:
    from tokenizers import Regex

    return [pre.Split(Regex(r"\p{N}"), behavior="isolated"), pre.ByteLevel(add_prefix_space=False, use_regex=True)]


def _llama3(pre: Any) -> list[Any]:
    from tokenizers import Regex

    return [
        pre.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre.ByteLevel(add_prefix_space=False, use_regex=False),
    ]


LLAMA3 = frozenset({"llama-bpe", "llama3"})
"""Pre-tokenizer names for which llama.cpp ignores the merges for whole words and adds BOS by default."""

PRE_TOKENIZERS: dict[str, Callable[[Any], list[Any]]] = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "smollm": _smollm,
    "llama-bpe": _llama3,
    "llama3": _llama3,
}


def build_tokenizer(metadata: Mapping[str, Any]) -> Any:
    """The tokenizer a GGUF file's metadata describes (a ``tokenizers.Tokenizer``).

    Raises:
        ValueError: a tokenizer model or pre-tokenizer this function does not build (named), or missing
            vocabulary or merges.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"the GGUF tokenizer model is {kind!r}; only byte-level BPE ('gpt2') is implemented")
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"the GGUF pre-tokenizer {pre!r} is not implemented; known: {', '.join(PRE_TOKENIZERS)}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError("the GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=pre in LLAMA3))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[pre](pre_tokenizers))
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok, t in zip(tokens, types, strict=True) if t == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(tok, normalized=False) for tok, t in zip(tokens, types, strict=True) if t == USER_DEFINED]
    )
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", pre in LLAMA3) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)]
        )
    return tokenizer
