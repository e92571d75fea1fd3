"""The BERT encoder on small random weights: name mapping, loading checks, and equality with transformers."""

from __future__ import annotations

import json

import pytest
import torch

from selfattention.models.bert import BertConfig, BertEncoder, hf_name, load_hf_state_dict, mean_pool

SMALL = {
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 32,
    "max_position_embeddings": 12,
}


def test_hf_names_map_to_ours() -> None:
    assert hf_name("encoder.layer.3.attention.self.query.weight") == "layers.3.attention.W_query.weight"
    assert hf_name("encoder.layer.0.attention.output.dense.bias") == "layers.0.attention.out_proj.bias"
    assert hf_name("encoder.layer.5.output.LayerNorm.weight") == "layers.5.output_norm.weight"
    assert hf_name("bert.embeddings.word_embeddings.weight") == "embeddings.word.weight"
    assert hf_name("pooler.dense.weight") is None
    assert hf_name("embeddings.position_ids") is None
    with pytest.raises(KeyError, match=r"unexpected weight 'encoder.layer.0.crossattention.weight'"):
        hf_name("encoder.layer.0.crossattention.weight")


def _hf_pair(seed: int = 0, **overrides):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is not installed")
    torch.manual_seed(seed)
    sizes = {**SMALL, **overrides}
    reference = transformers.BertModel(transformers.BertConfig(**sizes, hidden_act="gelu")).eval()
    ours = BertEncoder(BertConfig(**sizes))
    load_hf_state_dict(ours, reference.state_dict())
    return reference, ours.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_random_weights_equal_transformers_bertmodel(seed: int) -> None:
    reference, ours = _hf_pair(seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (3, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    types = torch.randint(0, 2, (3, 7), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        got = ours(ids, mask, types)
    assert len(got.hidden_states) == len(expected.hidden_states) == SMALL["num_hidden_layers"] + 1
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_tokens() -> None:
    torch.manual_seed(0)
    encoder = BertEncoder(BertConfig(**SMALL)).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    with torch.no_grad():
        batched = encoder(ids, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])).last_hidden_state
        alone = encoder(ids[1:, :2]).last_hidden_state
    torch.testing.assert_close(batched[1, :2], alone[0])


def test_load_names_missing_and_unexpected_weights() -> None:
    reference, ours = _hf_pair()
    state = dict(reference.state_dict())
    del state["encoder.layer.1.attention.self.key.bias"]
    state["encoder.layer.1.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"missing \['layers.1.attention.W_key.bias'\], unexpected \['encoder.layer.1.attention.self.rotary",
    ):
        load_hf_state_dict(ours, state)


def test_load_names_a_shape_mismatch() -> None:
    reference, _ = _hf_pair()
    wider = BertEncoder(BertConfig(**{**SMALL, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"size mismatch for layers.0.intermediate.weight"):
        load_hf_state_dict(wider, reference.state_dict())


def test_config_rejects_what_the_encoder_does_not_implement() -> None:
    accepted = {**SMALL, "model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    assert BertConfig.from_dict(accepted) == BertConfig(**SMALL)
    with pytest.raises(ValueError, match="model_type is 'roberta'"):
        BertConfig.from_dict({"model_type": "roberta"})
    with pytest.raises(ValueError, match="hidden_act is 'relu'"):
        BertConfig.from_dict({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="position_embedding_type is 'relative_key'"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})


def test_encoder_rejects_bad_ids() -> None:
    encoder = BertEncoder(BertConfig(**SMALL))
    assert encoder(torch.ones(1, 12, dtype=torch.long)).last_hidden_state.shape == (1, 12, 16)  # the longest
    with pytest.raises(ValueError, match="13 word pieces exceed the 12 positions"):
        encoder(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\), got 1..50"):
        encoder(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="input_ids must be integer"):
        encoder(torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4))


def test_mean_pool_leaves_out_padding_and_normalises() -> None:
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 0.0]]))


def test_large_activations_separate_the_erf_gelu_from_the_tanh_one() -> None:
    """BERT's "gelu" is the exact erf form; the tanh approximation differs by up to ~5e-4 near |x| = 2.

    With the default init (std 0.02) the MLP's inputs stay near 0, where the two agree to 1e-7, so a test
    at 1e-5 cannot tell them apart. Weights of std 0.5 put the pre-activations at std ~2: there the tanh
    form is off by far more than the tolerance, which the last assertion checks.
    """
    reference, ours = _hf_pair(seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("weight") and param.dim() == 2 and "embeddings" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    load_hf_state_dict(ours, reference.state_dict())
    ids = torch.randint(1, SMALL["vocab_size"], (2, 9), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = ours(ids).last_hidden_state
        inputs = ours.layers[0].intermediate(ours.embeddings(ids, torch.zeros_like(ids)))
        assert inputs.std() > 1.0  # the regime where the two forms differ
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for layer in ours.layers:
            layer.activation = torch.nn.GELU(approximate="tanh")
        tanh = ours(ids).last_hidden_state
    assert (tanh - expected).abs().max() > 20 * 1e-5  # the test above would fail for the tanh form


def test_config_from_json_reads_a_hugging_face_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "config.json"
    hf_config = {
        **SMALL,
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }
    path.write_text(json.dumps(hf_config), encoding="utf-8")
    assert BertConfig.from_json(path) == BertConfig(**SMALL, layer_norm_eps=1e-6)


def test_output_carries_the_boolean_mask() -> None:
    encoder = BertEncoder(BertConfig(**SMALL))
    ids = torch.tensor([[5, 6, 7], [9, 10, 0]])
    padded = encoder(ids, torch.tensor([[1, 1, 1], [1, 1, 0]])).attention_mask
    assert padded.dtype == torch.bool
    assert padded.tolist() == [[True, True, True], [True, True, False]]
    assert encoder(ids).attention_mask.tolist() == [[True] * 3] * 2  # no mask: every token is real


def test_layer_norm_eps_of_the_config_reaches_every_norm() -> None:
    """An eps of 0.1 moves each LayerNorm's output far past 1e-5 from one left at PyTorch's default (1e-5)."""
    reference, ours = _hf_pair(seed=2, layer_norm_eps=0.1)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True).hidden_states
        got = ours(ids).hidden_states
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_padding_token_embedding_gets_no_gradient_as_in_transformers() -> None:
    """Fine-tuning: the word embedding's gradient equals BertModel's, whose pad row (id 0) gets none."""
    reference, ours = _hf_pair(seed=4)
    generator = torch.Generator().manual_seed(4)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = (ids != 0).long()
    upstream = torch.randn(2, 4, SMALL["hidden_size"], generator=generator)  # a loss touching every position
    (reference(input_ids=ids, attention_mask=mask).last_hidden_state * upstream).sum().backward()
    (ours(ids, mask).last_hidden_state * upstream).sum().backward()
    expected = reference.embeddings.word_embeddings.weight.grad
    got = ours.embeddings.word.weight.grad
    assert expected is not None and got is not None
    assert expected[0].abs().max() == 0  # what transformers does, which the comparison below holds us to
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_load_names_an_unexpected_weight_alone_wherever_it_comes() -> None:
    reference, ours = _hf_pair()
    state = {"encoder.layer.0.attention.self.rotary.weight": torch.zeros(1), **reference.state_dict()}
    with pytest.raises(
        ValueError, match=r"missing \[\], unexpected \['encoder.layer.0.attention.self.rotary.weight'\]"
    ):
        load_hf_state_dict(ours, state)


def test_load_names_at_most_five_weights_of_each_kind() -> None:
    reference, ours = _hf_pair()
    state = {name: t for name, t in reference.state_dict().items() if not name.startswith("encoder.layer.1.")}
    state.update({f"encoder.layer.0.extra{i}.weight": torch.zeros(1) for i in range(7)})
    with pytest.raises(ValueError, match="weights do not fit the encoder") as error:
        load_hf_state_dict(ours, state)
    message = str(error.value)
    assert message.count("'layers.1.") == 5  # of the 16 missing
    assert message.count("extra") == 5  # of the 7 unexpected


def test_load_rejects_a_checkpoint_with_more_layers_than_the_config() -> None:
    reference, _ = _hf_pair(num_hidden_layers=3)
    two_layers = BertEncoder(BertConfig(**SMALL))
    with pytest.raises(ValueError, match=r'Unexpected key\(s\) in state_dict: "layers\.2\.'):
        load_hf_state_dict(two_layers, reference.state_dict())


def test_mean_pool_equals_the_float64_mean_of_each_sentence_normalised() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    expected = torch.stack([hidden[b, : int(mask[b].sum())].double().mean(dim=0) for b in range(3)])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled, expected.float())  # float32 defaults: sums of at most 4 terms of O(1)


def test_mean_pool_keeps_the_dtype_of_the_hidden_states() -> None:
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    pooled = mean_pool(hidden, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))  # a float32 mask
    assert pooled.dtype == torch.bfloat16
    expected = mean_pool(hidden.float(), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(pooled.float(), expected, atol=1e-2, rtol=1e-2)  # bfloat16: 8 bits of mantissa
