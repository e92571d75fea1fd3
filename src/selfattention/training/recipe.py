"""Training a :class:`selfattention.GPT` on a text corpus: the pieces of this package put together.

:func:`train_gpt` reads the corpus, builds or loads the tokenizer and model, runs the model-agnostic
:class:`~selfattention.training.loop.Trainer` (data-parallel under ``torchrun``), and writes checkpoints and
the loss curve into the output folder. The configs (``--config``):

=========  ===============================================================================================
``tiny``   2 layers, 2 heads, width 32, context 32, 300 steps of batch 8: seconds, for tests and demos
``small``  the default: 4 layers, 4 heads, width 128, context 64, 2000 steps of batch 12, AdamW at 1e-3
           with 100 warmup steps and cosine decay to 1e-4: the usual CPU reference configuration
=========  ===============================================================================================
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from selfattention.models.gpt import GPT, GPTConfig
from selfattention.training import ddp
from selfattention.training.checkpoint import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    Checkpoint,
    check_weights,
    clean_leftovers,
    holds_checkpoint,
    load_checkpoint,
    load_weights,
    new_run_id,
    save_checkpoint,
)
from selfattention.training.data import check_length, read_corpus, sample_batch, split
from selfattention.training.loop import History, TrainConfig, Trainer
from selfattention.training.tokenizer import Tokenizer, train_tokenizer

CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
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
MAX_UNSAVED_BUFFER_BYTES = 2**30
"""A checkpoint's model may need at most this much memory beyond its weights (RoPE tables): a guard against
a ``context_length`` edited to 1e8 in ``config.json``."""
PLOT_EVERY_S = 60.0
"""The loss curve is redrawn at checkpoints at most this often (and always at the end or on Ctrl-C)."""


@dataclass
class RunOptions:
    """What ``selfattention train`` asks for. ``model``/``train`` override the named config's values by name."""

    out: Path
    corpus: str | None = None
    config: str = "small"
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
    """The config named in ``options`` with its overrides applied.

    A ``learning_rate`` given without a ``min_learning_rate`` moves the floor of the cosine decay with it,
    keeping the config's ratio (a tenth in both configs): ``--lr 1e-4`` decays to 1e-5, where a fixed floor
    above the new peak could not be used.

    Raises:
        ValueError: for an unknown config name.
    """
    if options.config not in CONFIGS:
        raise ValueError(f"unknown config {options.config!r}; choose one of {list(CONFIGS)}")
    model, train = CONFIGS[options.config]
    model_config = GPTConfig(vocab_size=vocab_size, **{**model, **options.model})
    train = {**TrainConfig.defaults(), **train}
    if "learning_rate" in options.train and "min_learning_rate" not in options.train:
        ratio = train["min_learning_rate"] / train["learning_rate"]
        train["min_learning_rate"] = ratio * options.train["learning_rate"]
    return model_config, TrainConfig(**{**train, **options.train})


def train_gpt(options: RunOptions) -> RunResult:
    """Train (or, with ``options.resume``, continue training) a GPT; see the module docstring.

    Raises:
        ValueError: a bad corpus, config name or checkpoint, or a resume on a different corpus.
    """
    info = ddp.setup(device=options.device)
    try:
        result = _train(options, info)
    except BaseException:
        ddp.teardown(info, wait=False)
        raise
    ddp.teardown(info)
    return result


def _train(options: RunOptions, info: ddp.DistInfo) -> RunResult:
    text = read_corpus(options.corpus)
    _check_options(options)
    if info.rank == 0:
        clean_leftovers(options.out)  # what a save interrupted by a kill left behind
    setup = _resumed(options, text, info.world_size) if options.resume else _fresh(options, text)
    batches = _Batches(setup, info)
    torch.manual_seed(setup.train_config.seed)
    model = GPT(setup.model_config).to(info.device)
    if setup.checkpoint is not None:
        load_weights(model, setup.checkpoint.weights, setup.checkpoint.directory / WEIGHTS)
    trainer = Trainer(
        ddp.wrap(model, info),
        setup.train_config,
        batches.train,
        batches.val,
        checkpoint=_Saver(options, setup, model, info.world_size),
        rank=info.rank,
        world_size=info.world_size,
        progress=options.progress,
    )
    if setup.checkpoint is not None:
        assert setup.checkpoint.trainer_tensors is not None
        trainer.load_state(setup.checkpoint.trainer_tensors, setup.checkpoint.config["trainer"])
    start = time.perf_counter()
    history = trainer.run()
    return RunResult(
        history, trainer.step, time.perf_counter() - start, model.num_parameters(), Path(options.out), info.rank
    )


def _check_options(options: RunOptions) -> None:
    """Refuse settings that contradict each other or would replace a checkpoint unasked."""
    if options.resume and (options.model or options.train):
        names = sorted({**options.model, **options.train})
        raise ValueError(f"--resume continues the saved configuration; do not also set {names}")
    if holds_checkpoint(options.out) and not (options.resume or options.overwrite):
        raise ValueError(
            f"{options.out} already holds a checkpoint; pass --resume to continue it or --overwrite to replace it"
        )


@dataclass(frozen=True)
class _Setup:
    """What a run trains: the tokenizer, the two configs, the run id, the corpus and (resuming) the checkpoint."""

    tokenizer: Tokenizer
    model_config: GPTConfig
    train_config: TrainConfig
    run: str
    text: str
    data: dict[str, Any]
    """``{"corpus", "sha256", "tokens"}``, saved with the trainer's state; ``tokens`` is filled by :class:`_Batches`."""
    checkpoint: Checkpoint | None = None


def _corpus_record(options: RunOptions, text: str) -> dict[str, Any]:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {"corpus": options.corpus or "<shipped shakespeare.txt>", "sha256": digest}


def _fresh(options: RunOptions, text: str) -> _Setup:
    """A new run: a tokenizer trained on ``text``, the chosen config with its overrides, a new run id."""
    tokenizer = train_tokenizer(options.tokenizer, text, vocab_size=options.bpe_vocab_size)
    model_config, train_config = configs(options, tokenizer.vocab_size)
    return _Setup(tokenizer, model_config, train_config, new_run_id(), text, _corpus_record(options, text))


def _resumed(options: RunOptions, text: str, world_size: int) -> _Setup:
    """The run saved in ``options.out``, checked to have been trained on this ``text`` by as many processes.

    The batch size is per process, so another number of processes would change the global batch (and the
    losses) without a word: refused, naming both.
    """
    checkpoint = load_checkpoint(options.out, need_trainer=True)
    data = _corpus_record(options, text)
    trainer_json = checkpoint.config["trainer"]
    saved_world = trainer_json.get("world_size", 1)
    if saved_world != world_size:
        raise ValueError(
            f"cannot resume {options.out} with {world_size} process(es): it was trained with {saved_world} "
            f"(the batch size is per process); resume it with {saved_world}"
        )
    saved = trainer_json.get("data", {}).get("sha256") if isinstance(trainer_json.get("data"), dict) else None
    if saved != data["sha256"]:
        raise ValueError(
            f"cannot resume {options.out}: it was trained on a different corpus "
            f"(sha256 {saved}, this one {data['sha256']})"
        )
    model_config = checked_model_config(checkpoint)
    where = f"{checkpoint.directory / CONFIG}: trainer.config"
    if "config" not in trainer_json:
        raise ValueError(f"{where} is missing")
    train_config = _typed(TrainConfig, trainer_json["config"], where)
    return _Setup(checkpoint.tokenizer, model_config, train_config, checkpoint.run, text, data, checkpoint)


class _Batches:
    """The tokenized corpus split into training and validation, and a batch of each on demand."""

    def __init__(self, setup: _Setup, info: ddp.DistInfo) -> None:
        ids = torch.tensor(setup.tokenizer.encode(setup.text), dtype=torch.long)
        setup.data["tokens"] = len(ids)
        train_ids, val_ids = split(ids)
        self.block = setup.model_config.context_length
        check_length("training", train_ids, self.block)
        check_length("validation", val_ids, self.block)
        self.train_ids, self.val_ids = train_ids.to(info.device), val_ids.to(info.device)
        self.batch, self.info = setup.train_config.batch_size, info

    def train(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a training batch: ``(inputs, targets)``, each ``(batch, block)``."""
        info = self.info
        return sample_batch(
            self.train_ids, self.batch, self.block, generator, rank=info.rank, world_size=info.world_size
        )

    def val(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A validation batch: rank 0 validates alone, on the global batch (the numbers of one process)."""
        return sample_batch(self.val_ids, self.batch * self.info.world_size, self.block, generator)


class _Saver:
    """The trainer's checkpoint hook: saves the run and redraws the loss curve now and then."""

    def __init__(self, options: RunOptions, setup: _Setup, model: GPT, world_size: int) -> None:
        self.out, self.setup, self.model, self.world_size = Path(options.out), setup, model, world_size
        self.last_plot = time.monotonic()

    def __call__(self, trainer: Trainer) -> None:
        """Save a checkpoint of ``trainer``'s step, then the loss curve if it is due."""
        setup = self.setup
        state = {**trainer.state_json(), "data": setup.data, "world_size": self.world_size}
        save_checkpoint(
            self.out,
            model=self.model,
            model_config=setup.model_config.to_dict(),
            tokenizer=setup.tokenizer,
            step=trainer.step,
            run=setup.run,
            trainer_tensors=trainer.state_tensors(),
            trainer_json=state,
        )
        final = trainer.step == setup.train_config.max_steps or trainer.stopping
        now = time.monotonic()
        if trainer.history.train and (final or now - self.last_plot > PLOT_EVERY_S):
            self.last_plot = now
            self._plot(trainer)

    def _plot(self, trainer: Trainer) -> None:
        # matplotlib is heavy and optional for the library: imported only when a curve is drawn
        from selfattention.viz.loss_curve import plot_losses

        history, setup = trainer.history, self.setup
        title = f"{self.model.num_parameters():,} parameters, {setup.tokenizer.kind} tokens, step {trainer.step}"
        plot_losses(history.train, history.val, self.out / LOSS_CURVE, title=title)


def load_gpt(directory: str | Path) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint folder.

    Raises:
        ValueError: naming the file, for a missing, truncated or mismatched checkpoint.
    """
    checkpoint = load_checkpoint(directory)
    config = checked_model_config(checkpoint)
    model = GPT(config)
    load_weights(model, checkpoint.weights, checkpoint.directory / WEIGHTS)
    if checkpoint.tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{checkpoint.directory / TOKENIZER} has {checkpoint.tokenizer.vocab_size} tokens but the "
            f"model {config.vocab_size}"
        )
    return model.eval(), checkpoint.tokenizer


def checked_model_config(checkpoint: Checkpoint) -> GPTConfig:
    """The checkpoint's :class:`GPTConfig`, checked against its weights before anything is allocated.

    The model is first built on the ``meta`` device (no memory), its tensors compared with the weights
    file by name, shape and dtype, and the memory it needs beyond them (RoPE tables) bounded.

    Raises:
        ValueError: naming ``config.json``, for a bad type or value, or a config that does not match the weights.
    """
    path = checkpoint.directory / CONFIG
    values = dict(checkpoint.config["model"])
    kind = values.pop("type", "gpt")
    if kind != "gpt":
        raise ValueError(f"{path}: model type {kind!r} is not 'gpt'")
    config = _typed(GPTConfig, values, f"{path}: model")
    if config.num_layers > len(checkpoint.weights):
        raise ValueError(
            f"{path}: model.num_layers is {config.num_layers} but {WEIGHTS} holds only "
            f"{len(checkpoint.weights)} tensors"
        )
    with torch.device("meta"):
        skeleton = GPT(config)
    check_weights(skeleton, checkpoint.weights, f"{path} with {checkpoint.directory / WEIGHTS}")
    saved = set(skeleton.state_dict())
    extra = sum(b.numel() * b.element_size() for n, b in skeleton.named_buffers() if n not in saved)
    if extra > MAX_UNSAVED_BUFFER_BYTES:
        raise ValueError(
            f"{path}: this model needs {extra / 2**30:.1f} GiB beyond its weights (context_length "
            f"{config.context_length}); at most {MAX_UNSAVED_BUFFER_BYTES / 2**30:.0f} GiB is allowed"
        )
    return config


def _typed(cls: Any, values: Any, where: str) -> Any:
    """``cls(**values)`` for a dataclass, each value checked against its field's annotation first.

    Raises:
        ValueError: naming ``where``, for a non-object, an unknown key, a value of the wrong type (a float
            where an int belongs, ``true`` for a number, an infinite or huge number) or a rejected value.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be an object, got {type(values).__name__}")
    kinds = {f.name: str(f.type) for f in fields(cls)}
    for key, value in values.items():
        if key not in kinds:
            raise ValueError(f"{where}: unknown key {key!r}")
        if not _fits(value, kinds[key]):
            raise ValueError(f"{where}: {key} must be {kinds[key]}, got {str(value)[:40]}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def _fits(value: Any, kind: str) -> bool:
    """Whether a JSON value has the type named by a dataclass annotation (``int``, ``float | None``...)."""
    options = {part.strip() for part in kind.split("|")}
    if value is None:
        return "None" in options
    if isinstance(value, bool):
        return "bool" in options
    if isinstance(value, int) and ("int" in options or "float" in options):
        return abs(value) <= 2**53
    if isinstance(value, float):
        return "float" in options and math.isfinite(value)
    return isinstance(value, str) and "str" in options
