"""Checkpoints: a round trip that loses nothing, and clear errors for bad folders and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfattention.models.gpt import GPT, GPTConfig
from selfattention.training.checkpoint import load_checkpoint, load_weights, save_checkpoint
from selfattention.training.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = CharTokenizer("abcdefgh")


def model(**overrides) -> GPT:
    config = {"vocab_size": 8, "context_length": 16, "emb_dim": 16, "num_layers": 2, "num_heads": 2}
    return GPT(GPTConfig(**{**config, **overrides}))


def save(folder: Path, net: GPT, step: int = 3) -> Path:
    trainer = {"rng.data": torch.Generator().manual_seed(1).get_state(), "optimizer.0.exp_avg": torch.ones(2)}
    return save_checkpoint(
        folder,
        model=net,
        model_config=net.config.to_dict(),
        tokenizer=TOKENIZER,
        step=step,
        trainer_tensors=trainer,
        trainer_json={"step": step},
    )


def test_round_trip_restores_every_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = model()
    save(tmp_path / "ckpt", net)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer.safetensors",
    ]
    loaded = load_checkpoint(tmp_path / "ckpt", need_trainer=True)
    assert loaded.step == 3
    assert "out_head.weight" not in loaded.weights  # tied to tok_emb.weight: stored once
    fresh = model()
    load_weights(fresh, loaded.weights, "model.safetensors")
    for (name, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.out_head.weight is fresh.tok_emb.weight
    assert loaded.trainer_tensors is not None
    assert torch.equal(loaded.trainer_tensors["optimizer.0.exp_avg"], torch.ones(2))
    assert loaded.tokenizer.encode("bad") == TOKENIZER.encode("bad")


def test_no_temporary_files_are_left(tmp_path: Path) -> None:
    save(tmp_path, model())
    save(tmp_path, model(), step=4)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_weights_name_the_file(tmp_path: Path) -> None:
    save(tmp_path, model())
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(truncated"):
        load_checkpoint(tmp_path)


def test_truncated_config_names_the_file(tmp_path: Path) -> None:
    save(tmp_path, model())
    path = tmp_path / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(truncated or corrupt\?\)"):
        load_checkpoint(tmp_path)


def test_files_from_different_steps_are_refused(tmp_path: Path) -> None:
    save(tmp_path, model(), step=3)
    config = json.loads((tmp_path / "config.json").read_text())
    config["step"] = 5  # as if the save at step 5 stopped after writing config.json only
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors is from step 3 but config.json from step 5"):
        load_checkpoint(tmp_path)


def test_mismatched_shapes_name_the_tensor(tmp_path: Path) -> None:
    save(tmp_path, model())
    weights = load_checkpoint(tmp_path).weights
    with pytest.raises(ValueError, match=r"tensor tok_emb.weight has shape \(8, 16\), the model expects \(8, 32\)"):
        load_weights(model(emb_dim=32), weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not match the model: missing \['blocks.2"):
        load_weights(model(num_layers=3), weights, tmp_path / "model.safetensors")


def test_missing_pieces(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint folder .* does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"config.json is missing: .* is not a checkpoint folder"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, model=model(), model_config={}, tokenizer=TOKENIZER, step=0)
    with pytest.raises(ValueError, match=r"trainer.safetensors is missing: this checkpoint holds weights only"):
        load_checkpoint(tmp_path, need_trainer=True)
    (tmp_path / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match=r"config.json is not a selfattention-checkpoint config"):
        load_checkpoint(tmp_path)
