"""Resuming and loading a trained GPT: config.json is checked against the weights before anything is allocated."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from selfattention.training.checkpoint import config_digest
from selfattention.training.recipe import RunOptions, load_gpt, train_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = "To be, or not to be, that is the question.\n" * 40
SMALL = {"emb_dim": 16, "context_length": 16, "num_layers": 2, "num_heads": 2}
SHORT = {"max_steps": 2, "eval_interval": 2, "eval_batches": 1, "batch_size": 4}


def trained(tmp_path: Path, name: str = "run", **model: Any) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / name
    train_gpt(RunOptions(out, str(corpus), "tiny", progress=False, model={**SMALL, **model}, train=SHORT))
    return out


def resume(out: Path) -> None:
    train_gpt(RunOptions(out, str(out.parent / "corpus.txt"), "tiny", resume=True, progress=False))


def edit(out: Path, change: Any) -> None:
    path = out / json.loads((out / "latest.json").read_text())["folder"] / "config.json"
    config = json.loads(path.read_text())
    change(config)
    # sealed as a save would (these tests are about the content), "1e999" as the number the file will hold
    config["sha256"] = config_digest(json.loads(json.dumps(config).replace('"1e999"', "1e999")))
    path.write_text(json.dumps(config).replace('"1e999"', "1e999"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(tmp_path_factory.mktemp("recipe"))


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copy(run.parent / "corpus.txt", tmp_path / "corpus.txt")
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["model"].update(context_length=100_000_000),
            r"tensor pos_emb.weight has shape \(16, 16\), the model expects \(100000000, 16\)",
        ),
        (lambda c: c["model"].update(context_length=1e8), r"model: context_length must be int, got 100000000.0"),
        (lambda c: c["model"].update(emb_dim="16"), r"model: emb_dim must be int, got 16"),
        (lambda c: c["model"].update(num_heads=True), r"model: num_heads must be int, got True"),
        (lambda c: c["model"].update(num_layers=10**9), r"num_layers is 1000000000 but model.safetensors holds only"),
        (lambda c: c["model"].update(num_layers=10**30), r"model: num_layers must be int, got 1000000000000000000"),
        (lambda c: c["model"].update(dropout="1e999"), r"model: dropout must be float, got inf"),
        (lambda c: c["model"].update(widths=3), r"model: unknown key 'widths'"),
        (lambda c: c["model"].update(type="llama"), r"model type 'llama' is not 'gpt'"),
        (lambda c: c["model"].update(num_heads=3), r"emb_dim \(16\) must be divisible by num_heads \(3\)"),
    ],
)
def test_a_bad_model_config_is_refused_before_allocating(copy: Path, change: Any, message: str) -> None:
    edit(copy, change)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        load_gpt(copy)
    with pytest.raises(ValueError, match=message):
        resume(copy)
    assert time.perf_counter() - start < 30  # 1e8 positions would take a minute and 12.7 GB to allocate


def test_a_rope_model_with_a_huge_context_is_refused(tmp_path: Path) -> None:
    out = trained(tmp_path, rope=True)
    edit(out, lambda c: c["model"].update(context_length=100_000_000))
    with pytest.raises(ValueError, match=r"needs 0.7 GiB beyond its weights|needs \d+\.\d GiB beyond its weights"):
        load_gpt(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["trainer"].pop("config"), r"trainer.config is missing"),
        (lambda c: c["trainer"]["config"].update(max_steps="1e999"), r"trainer.config: max_steps must be int"),
        (lambda c: c["trainer"]["config"].update(max_steps=0), r"max_steps must be at least 1, got 0"),
        (lambda c: c["trainer"]["config"].update(colour=1), r"trainer.config: unknown key 'colour'"),
        (lambda c: c["trainer"].update(config=[]), r"trainer.config must be an object, got list"),
        (lambda c: c.update(trainer=None), r"'trainer' must be an object to resume"),
        (lambda c: c["trainer"].update(step="1e999"), r"saved trainer state is malformed: .*step inf"),
        (lambda c: c["trainer"]["history"].update(train=[["1e999", 1]]), r"saved trainer state is malformed"),
        (lambda c: c["trainer"]["history"].pop("val"), r"saved trainer state is malformed: 'val'"),
        (lambda c: c["trainer"].update(optimizer_groups={}), r"optimizer_groups must be a list of objects"),
        (lambda c: c["trainer"]["optimizer_groups"].pop(), r"saved optimizer has 1 parameter groups, expected 2"),
    ],
)
def test_a_bad_trainer_config_is_refused(copy: Path, change: Any, message: str) -> None:
    edit(copy, change)
    with pytest.raises(ValueError, match=message):
        resume(copy)


def test_resume_of_an_intact_copy_works(copy: Path) -> None:
    """The control for the tests above: the unedited copy resumes (and, at max_steps, has nothing to do)."""
    resume(copy)
    assert sorted(p.name for p in copy.iterdir()) == ["latest.json", "loss.png", "step-000000002"]
