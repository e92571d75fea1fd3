"""Data-parallel training with PyTorch's ``DistributedDataParallel``, set up from ``torchrun``'s environment.

``torchrun --nproc_per_node=2 -m selfattention train ...`` starts two processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` reads them and joins
the process group (``gloo`` on CPU, ``nccl`` on CUDA). Each rank computes gradients on its own slice of the
global batch and DDP averages them, so ``n`` ranks with batch ``b`` take the same steps as one process
with batch ``n * b``. Only rank 0 writes checkpoints, plots and logs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def setup(timeout_s: float = 120.0, *, device: str | torch.device | None = None) -> DistInfo:
    """Join the process group described by the environment; a single process when ``WORLD_SIZE`` is unset or 1.

    ``device``: where this process computes: ``"cpu"``, ``"cuda"`` (with several processes, GPU
    ``LOCAL_RANK`` each) or ``"cuda:N"`` (one process). ``None``: the CPU for one process, each process's
    GPU under torchrun when CUDA is available (and the CPU otherwise).

    Raises:
        ValueError: when ``RANK``/``WORLD_SIZE`` are malformed.
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must be integers"
        ) from None
    wanted = None if device is None else torch.device(device)
    if world_size <= 1:
        return DistInfo(device=wanted or torch.device("cpu"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK ({rank}) must be in [0, WORLD_SIZE={world_size})")
    import torch.distributed as dist

    cuda = torch.cuda.is_available() if wanted is None else wanted.type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistInfo(rank, world_size, device)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when there are several ranks, else unchanged."""
    if info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank ``rank``'s global random generator (its dropout masks) for training step ``step``.

    A function of the three numbers alone (the first 8 bytes of a sha256), so that every rank draws its own
    masks, every step new ones, and a run resumed at any step draws the masks an uninterrupted one would:
    the ranks' generator states need not be saved (only rank 0 writes the checkpoint).
    """
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def teardown(info: DistInfo, *, wait: bool = True) -> None:
    """Leave the process group (if this process joined one); with ``wait``, after every rank has got here.

    Rank 0 still writes the last checkpoint and plot when the others are done; a rank that tore its
    connections down meanwhile could be aborted by gloo ("terminate called without an active exception"),
    so after a normal run the ranks meet at a barrier first. After an error, ``wait=False`` leaves at once
    rather than wait for ranks that may never arrive. The group is destroyed even if the barrier fails.
    """
    import torch.distributed as dist

    if info.world_size > 1 and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()
