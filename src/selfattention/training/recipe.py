"""Training a :class:`selfattention.GPT` on a text corpus: the pieces of this package put together.

:func:`train_gpt` reads the corpus, builds or loads the tokenizer and model, runs the model-agnostic
:class:`~selfattention.training.loop.Trainer` (data-parallel under ``torchrun``), and writes checkpoints and
the loss curve into the output folder. The presets:

=========  ===============================================================================================
``tiny``   2 layers, 2 heads, width 32, context 32, 300 steps of batch 8: seconds, for tests and demos
``small``  the default: 4 layers, 4 heads, width 128, context 64, 2000 steps of batch 12, AdamW at 1e-3
           with 100 warmup steps and cosine decay to 1e-4: the usual CPU reference configuration
=========  ===============================================================================================
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfattention.models.gpt import GPT, GPTConfig
from selfattention.training import distributed
from selfattention.training.checkpoint import CONFIG, load_checkpoint, load_weights, save_checkpoint
from selfattention.training.data import check_length, read_corpus, sample_batch, split
from selfattention.training.loop import History, TrainConfig, Trainer
from selfattention.training.tokenizer import Tokenizer, train_tokenizer

PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        {"context_length": 32, "emb_dim": 32, "num_layers": 2, "num_heads": 2},
        {
            "max_steps": 300,
            "batch_size": 8,
            "warmup_steps": 20,
            "eval_interval": 100,
            "eval_batches": 5,
            "learning_rate": 3e-3,
            "min_learning_rate": 3e-4,
        },
    ),
    "small": (
        {"context_length": 64, "emb_dim": 128, "num_layers": 4, "num_heads": 4},
        {"max_steps": 2000, "batch_size": 12, "warmup_steps": 100, "eval_interval": 250},
    ),
}
LOSS_CURVE = "loss.png"
PLOT_EVERY_S = 60.0
"""The loss curve is redrawn at checkpoints at most this often (and always at the end or on Ctrl-C)."""


@dataclass
class RunOptions:
    """What ``selfattention train`` asks for. ``model``/``train`` override the preset's values by name."""

    out: Path
    corpus: str | None = None
    preset: str = "small"
    tokenizer: str = "char"
    bpe_vocab_size: int = 512
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``; under torchrun, ``cuda`` is each process's GPU (``LOCAL_RANK``)."""


@dataclass
class RunResult:
    """How a run went: the losses, the step reached, the wall time, the model's size."""

    history: History
    step: int
    seconds: float
    parameters: int
    out: Path
    rank: int


def configs(options: RunOptions, vocab_size: int) -> tuple[GPTConfig, TrainConfig]:
    """The preset named in ``options`` with its overrides applied.

    Raises:
        ValueError: for an unknown preset.
    """
    if options.preset not in PRESETS:
        raise ValueError(f"unknown config {options.preset!r}; choose one of {list(PRESETS)}")
    model, train = PRESETS[options.preset]
    model_config = GPTConfig(vocab_size=vocab_size, **{**model, **options.model})
    return model_config, TrainConfig(**{**train, **options.train})


def train_gpt(options: RunOptions) -> RunResult:
    """Train (or, with ``options.resume``, continue training) a GPT; see the module docstring.

    Raises:
        ValueError: a bad corpus, preset or checkpoint, or a resume on a different corpus.
    """
    info = distributed.setup(device=options.device)
    try:
        result = _train(options, info)
    except BaseException:
        distributed.teardown(info, wait=False)
        raise
    distributed.teardown(info)
    return result


def _train(options: RunOptions, info: distributed.DistInfo) -> RunResult:
    text = read_corpus(options.corpus)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if options.resume and (options.model or options.train):
        names = sorted({**options.model, **options.train})
        raise ValueError(f"--resume continues the saved configuration; do not also set {names}")
    existing = Path(options.out) / CONFIG
    if existing.exists() and not (options.resume or options.overwrite):
        raise ValueError(
            f"{options.out} already holds a checkpoint; pass --resume to continue it or --overwrite to replace it"
        )
    checkpoint = load_checkpoint(options.out, need_trainer=True) if options.resume else None
    tokenizer: Tokenizer
    if checkpoint is not None:
        trainer_json = checkpoint.config.get("trainer") or {}
        saved = trainer_json.get("data", {}).get("sha256")
        if saved != digest:
            raise ValueError(
                f"cannot resume {options.out}: it was trained on a different corpus (sha256 {saved}, this one {digest})"
            )
        tokenizer = checkpoint.tokenizer
        model_config = GPTConfig.from_dict(checkpoint.config["model"])
        train_config = TrainConfig(**trainer_json["config"])
    else:
        tokenizer = train_tokenizer(options.tokenizer, text, vocab_size=options.bpe_vocab_size)
        model_config, train_config = configs(options, tokenizer.vocab_size)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = split(ids)
    block = model_config.context_length
    check_length("training", train_ids, block)
    check_length("validation", val_ids, block)

    torch.manual_seed(train_config.seed)
    model = GPT(model_config).to(info.device)
    if checkpoint is not None:
        load_weights(model, checkpoint.weights, checkpoint.directory / "model.safetensors")
    batch = train_config.batch_size
    train_ids, val_ids = train_ids.to(info.device), val_ids.to(info.device)

    def train_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_batch(train_ids, batch, block, generator, rank=info.rank, world_size=info.world_size)

    def val_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # rank 0 validates alone, on the global batch: the same numbers as a single process
        return sample_batch(val_ids, batch * info.world_size, block, generator)

    data = {"corpus": options.corpus or "<shipped shakespeare.txt>", "sha256": digest, "tokens": len(ids)}

    last_plot = [time.monotonic()]

    def save(trainer: Trainer) -> None:
        from selfattention.viz.loss_curve import plot_losses

        state = {**trainer.state_json(), "data": data, "world_size": info.world_size}
        save_checkpoint(
            options.out,
            model=model,
            model_config=model_config.to_dict(),
            tokenizer=tokenizer,
            step=trainer.step,
            trainer_tensors=trainer.state_tensors(),
            trainer_json=state,
        )
        history = trainer.history
        now = time.monotonic()
        final = trainer.step == train_config.max_steps or trainer.stopping
        if history.train and (final or now - last_plot[0] > PLOT_EVERY_S):
            last_plot[0] = now
            title = f"{model.num_parameters():,} parameters, {tokenizer.kind} tokens, step {trainer.step}"
            plot_losses(history.train, history.val, Path(options.out) / LOSS_CURVE, title=title)

    trainer = Trainer(
        distributed.wrap(model, info),
        train_config,
        train_batch,
        val_batch,
        checkpoint=save,
        rank=info.rank,
        world_size=info.world_size,
        progress=options.progress,
    )
    if checkpoint is not None:
        assert checkpoint.trainer_tensors is not None
        trainer.load_state(checkpoint.trainer_tensors, checkpoint.config["trainer"])
    start = time.perf_counter()
    history = trainer.run()
    return RunResult(
        history, trainer.step, time.perf_counter() - start, model.num_parameters(), Path(options.out), info.rank
    )


def load_gpt(directory: str | Path) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint folder.

    Raises:
        ValueError: naming the file, for a missing, truncated or mismatched checkpoint.
    """
    checkpoint = load_checkpoint(directory)
    try:
        config = GPTConfig.from_dict(checkpoint.config["model"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{checkpoint.directory / 'config.json'}: bad model config ({error})") from None
    model = GPT(config)
    load_weights(model, checkpoint.weights, checkpoint.directory / "model.safetensors")
    if checkpoint.tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{checkpoint.directory / 'tokenizer.json'} has {checkpoint.tokenizer.vocab_size} tokens but the "
            f"model {config.vocab_size}"
        )
    return model.eval(), checkpoint.tokenizer
