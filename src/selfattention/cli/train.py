"""``selfattention train``: train a small GPT on a text corpus (Shakespeare by default)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfattention.cli.device import add_device_argument, resolve_device
from selfattention.cli.errors import UsageError
from selfattention.cli.options import at_least, positive_number, probability, seed, some_path
from selfattention.files import make_folder
from selfattention.training.recipe import CONFIGS, RunOptions, configs

Option = tuple[str, Callable[[str], Any], str]
# option name -> (GPTConfig or TrainConfig field, type, help); the types check each value on its own, so that
# a bad one is reported under the option's name (`argument --steps: must be at least 1, got 0`)
MODEL_OPTIONS: dict[str, Option] = {
    "--context": ("context_length", at_least(1), "tokens the model sees at once"),
    "--width": ("emb_dim", at_least(1), "model width C"),
    "--layers": ("num_layers", at_least(1), "transformer blocks"),
    "--heads": ("num_heads", at_least(1), "attention heads"),
    "--kv-heads": ("num_kv_heads", at_least(1), "key/value heads (grouped-query attention)"),
    "--dropout": ("dropout", probability, "dropout probability in training"),
}
TRAIN_OPTIONS: dict[str, Option] = {
    "--steps": ("max_steps", at_least(1), "optimisation steps"),
    "--batch-size": ("batch_size", at_least(1), "sequences per step (per process under torchrun)"),
    "--lr": ("learning_rate", positive_number, "peak learning rate"),
    "--warmup": ("warmup_steps", at_least(0), "linear warmup steps"),
    "--eval-interval": ("eval_interval", at_least(1), "steps between validations and checkpoints"),
    "--seed": ("seed", seed, "seed of the weights and the data order"),
}
MAX_VOCAB = 1 << 20
"""The largest ``--vocab-size``: above any published tokenizer's; ``tokenizers`` allocates for the whole
vocabulary before training, so 10**9 aborted the process instead of saying no."""
OPTION_OF_FIELD = {field: name for name, (field, _, _) in {**MODEL_OPTIONS, **TRAIN_OPTIONS}.items()}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    parser = sub.add_parser(
        "train",
        help="train a small GPT by next-token prediction",
        description="Train a small GPT on a text corpus (four Shakespeare plays when no --corpus is given). "
        "Writes checkpoints and loss.png into --out. Under `torchrun --nproc_per_node=N -m selfattention "
        "train` it trains data-parallel.",
    )
    parser.add_argument("--corpus", metavar="FILE", help="UTF-8 text file (default: the shipped Shakespeare)")
    parser.add_argument(
        "--out", metavar="DIR", type=some_path, default="gpt-out", help="checkpoint folder (default: gpt-out)"
    )
    parser.add_argument("--config", choices=list(CONFIGS), default="small", help="model and schedule (default: small)")
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default="char", help="default: char")
    parser.add_argument(
        "--vocab-size", type=at_least(257, MAX_VOCAB), default=512, help="BPE vocabulary size (default: 512)"
    )
    parser.add_argument("--rope", action="store_true", default=None, help="rotary positions instead of learned")
    for name, (_, kind, text) in {**MODEL_OPTIONS, **TRAIN_OPTIONS}.items():
        parser.add_argument(name, type=kind, help=f"{text} (default: from --config)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    parser.add_argument(
        "--threads",
        type=at_least(1),
        help="intra-op CPU threads per process (default: PyTorch's own, i.e. OMP_NUM_THREADS or the cores; "
        "torchrun sets 1 per process)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(parser, note="; under torchrun, cuda means each process's own GPU (LOCAL_RANK)")
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace, options: dict[str, Option]) -> dict[str, Any]:
    chosen = {}
    for name, (field, _, _) in options.items():
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is not None:
            chosen[field] = value
    return chosen


def run(args: argparse.Namespace) -> int:
    """Train, then print where the checkpoint is and the final losses."""
    import torch

    from selfattention.training.recipe import train_gpt

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = _overrides(args, MODEL_OPTIONS)
    if args.rope:
        model["rope"] = True
    options = RunOptions(
        out=Path(args.out),
        corpus=args.corpus,
        config=args.config,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.vocab_size,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        model=model,
        train=_overrides(args, TRAIN_OPTIONS),
        device=str(device),
    )
    _check_together(options)
    make_folder(options.out)  # a folder that cannot be made is said now, not after the training
    try:
        result = train_gpt(options)
    except KeyboardInterrupt:
        from selfattention.training.checkpoint import resumable_step

        step = resumable_step(args.out)
        if step is None:
            print(f"interrupted; {args.out} holds no checkpoint that can resume")
        else:
            print(f"interrupted; continue from the checkpoint of step {step} in {args.out} with --resume")
        raise
    if result.rank == 0:
        val = f", val loss {result.history.val[-1][1]:.4f}" if result.history.val else ""
        train = result.history.train[-1][1] if result.history.train else float("nan")
        print(
            f"step {result.step}: train loss {train:.4f}{val} ({result.parameters:,} parameters, "
            f"{result.seconds:.0f} s); checkpoint and loss.png in {result.out}"
        )
    return 0


def _check_together(options: RunOptions) -> None:
    """Check the options against each other (``--width`` divisible by ``--heads``, ``--resume`` with neither
    overrides nor ``--overwrite``, ``--out`` not a file ...) before any work.

    The configs name their fields (``emb_dim``); the message names the options instead (``--width``).

    Raises:
        UsageError: when the config with these options is not a valid model or schedule.
    """
    import torch

    from selfattention.models.gpt import GPT

    if options.resume and (options.model or options.train):
        fields = {**options.model, **options.train}
        names = ", ".join(sorted(OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-")) for field in fields))
        raise UsageError(f"--resume continues the saved configuration; do not also set {names}")
    if options.resume and options.overwrite:
        raise UsageError("choose one of --resume (continue the checkpoint) and --overwrite (replace it)")
    if options.out.exists() and not options.out.is_dir():
        raise UsageError(f"--out {options.out} is a file; give a folder for the checkpoints")
    if options.resume and not options.out.exists():  # said before --out is made, which would hide a typo
        raise UsageError(f"--resume: {options.out} does not exist; give the folder of the run to continue")
    vocab = options.bpe_vocab_size if options.tokenizer == "bpe" else 256  # a character vocabulary is smaller
    try:
        model_config, _ = configs(options, vocab_size=vocab)
        with torch.device("meta"):  # build the model without memory: its layers check what the config does not
            parameters = sum(p.numel() for p in GPT(model_config).parameters())
    except ValueError as error:
        message = re.sub(r"\b[a-z_]+\b", lambda m: OPTION_OF_FIELD.get(m.group(0), m.group(0)), str(error))
        raise UsageError(message) from None
    _check_memory(parameters)


def _check_memory(parameters: int) -> None:
    """Refuse a model whose weights, gradients and AdamW moments alone (16 bytes a parameter in float32)
    exceed this machine's memory, before anything is allocated: the allocation would fail with a traceback
    or, worse, swap for hours."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it: nothing to compare
        return
    need = 16 * parameters
    if need > memory:
        raise UsageError(
            f"the model has {parameters:,} parameters: {need / 2**30:.1f} GiB with its gradients and AdamW "
            f"state, more than this machine's {memory / 2**30:.1f} GiB; lower --width, --layers or --vocab-size"
        )
