"""Start a function in several local processes joined by ``torch.distributed`` (gloo on the loopback).

This is how the tests, the benchmark and the example try :mod:`selfattention.distributed` on one machine
without ``torchrun``. It only starts processes and sets up the process group; all communication between
them goes through ``torch.distributed`` itself, so the code under test is the code that runs across
machines.

Failure handling: a rank that raises ends its process; the launcher gives the other ranks :data:`GRACE`
seconds to end on their own (a peer that fails too reports its own error), then terminates those still
running (which may be blocked waiting for the dead one) and raises :class:`LaunchError` naming every failed
rank, with the traceback of the failure seen first.
Collective and point-to-point operations also time out after ``op_timeout`` seconds, and the whole run after
``timeout`` seconds, so a failure never turns into a hang.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

HOST = "127.0.0.1"
GRACE = 2.0
"""Seconds the other ranks get to end on their own once one has failed, before they are terminated."""


GUARD = 'call it under `if __name__ == "__main__":`'
"""What a script that calls :func:`run_local` at its top level is told (by the rank, and by the launcher)."""
UNGUARDED = (
    f"run_local was called while a rank was starting, from the script's top level: {GUARD} (every rank imports "
    "the script to find the function it runs)"
)


class LaunchError(RuntimeError):
    """A rank failed, or the run did not finish in time."""


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    op_timeout: float = 30.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` processes sharing a gloo process group; return every result.

    Each process calls ``torch.distributed.init_process_group("gloo")`` on 127.0.0.1 (a free port chosen by
    the operating system), runs ``fn(*args)`` and returns its result to the caller (through a file, so it
    may hold tensors). ``fn`` must be importable by name (a module-level function), and a script must call
    ``run_local`` under ``if __name__ == "__main__":``: every rank imports the script's ``__main__`` module to
    find ``fn``, and an unguarded call would start ranks again from inside a rank (refused, naming the guard).

    Args:
        fn: the function each rank runs; it may call ``torch.distributed.get_rank()``.
        world_size: number of processes (>= 1).
        *args: passed to ``fn``; must be picklable.
        timeout: seconds for the whole run before every process is terminated.
        op_timeout: seconds any one ``torch.distributed`` operation may wait for a peer.
        threads: ``torch.set_num_threads`` in each process (keep ``world_size * threads`` <= cores).

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        ValueError: for ``world_size < 1``. LaunchError: when a rank fails or the run times out.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if getattr(mp.current_process(), "_inheriting", False):  # set by multiprocessing while a rank imports __main__
        raise RuntimeError(UNGUARDED)
    # The store lives in this process, so its port is free for sure (no pick-then-bind race).
    store = dist.TCPStore(HOST, 0, None, True, timeout=timedelta(seconds=op_timeout), wait_for_workers=False)
    ctx = mp.get_context("forkserver")
    # The fork server imports torch once; every rank is then a cheap fork of a process that has run no
    # threads (forking the caller itself would be unsafe once its OpenMP threads have started).
    ctx.set_forkserver_preload(
        # symbolic_shapes: torch imports it (and sympy, ~1 s) on the first backward; do it once here.
        [
            "__main__",
            "torch",
            "torch.distributed",
            "torch.fx.experimental.symbolic_shapes",
            "selfattention.distributed",
        ]
    )
    with tempfile.TemporaryDirectory(prefix="selfattention-launch-") as tmp:
        context = mp.start_processes(
            _worker,
            args=(fn, args, world_size, store.port, op_timeout, threads, tmp),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=_settle(context.processes, deadline)):
                if time.monotonic() >= deadline:
                    raise LaunchError(f"{world_size} ranks did not finish within {timeout} s")
        except ProcessException as error:  # join() has already terminated the other ranks
            raise LaunchError(_failures(context.error_files, error)) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                process.join(timeout=5)
                if process.is_alive():  # it ignored SIGTERM: every rank is gone when this returns
                    process.kill()
                    process.join()
            for name in context.error_files:
                Path(name).unlink(missing_ok=True)
        missing = [rank for rank in range(world_size) if not (Path(tmp) / f"rank{rank}.pt").exists()]
        if missing:  # a rank that left with status 0 (sys.exit(0), os._exit(0)) before returning a result
            raise LaunchError(f"rank(s) {missing} ended without an error but returned no result (exited early)")
        return [torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    world_size: int,
    port: int,
    op_timeout: float,
    threads: int,
    tmp: str,
) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_name())
    store = dist.TCPStore(HOST, port, world_size, False, timeout=timedelta(seconds=op_timeout))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=op_timeout)
    )
    try:
        result = fn(*args)
        path = Path(tmp) / f"rank{rank}.pt"
        torch.save(result, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    finally:
        dist.destroy_process_group()


def _settle(processes: list[Any], deadline: float) -> float:
    """Wait up to a second for a rank to end; once one has failed, up to :data:`GRACE` more for the others.

    ``join()`` terminates every other rank as soon as it sees a failure: a peer about to fail too (the same
    bad input on every rank) would be killed before writing its error. Returns the timeout for ``join()``,
    which then only collects what has happened (0).
    """
    running = [process.sentinel for process in processes if process.exitcode is None]
    if running:
        wait(running, timeout=max(0.0, min(1.0, deadline - time.monotonic())))
    end = min(deadline, time.monotonic() + GRACE)
    while any(process.exitcode not in (None, 0) for process in processes) and time.monotonic() < end:
        running = [process.sentinel for process in processes if process.exitcode is None]
        if not running:
            break
        wait(running, timeout=end - time.monotonic())
    return 0.0


def _failures(error_files: list[str], first: ProcessException) -> str:
    """One line per failed rank (its exception), then the full traceback of the failure seen first.

    When one rank raises, its peers often fail too (a connection reset, a timeout); listing every rank
    keeps the original error in view whichever rank the launcher noticed first.
    """
    lines = []
    for rank, name in enumerate(error_files):
        path = Path(name)
        if path.is_file() and path.stat().st_size > 0:
            with path.open("rb") as file:
                trace = pickle.load(file)
            lines.append(f"rank {rank} failed: {trace.strip().splitlines()[-1]}")
    if not lines and getattr(first, "exit_code", None) == 1:  # ended before fn ran: its own output says why
        lines.append(
            f"rank {first.error_index} ended before running the function; if the script calls run_local at its "
            f"top level, {GUARD}"
        )
    return "\n".join([*lines, str(first).strip()])


def loopback_name() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), for gloo to bind to."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return "lo0"
    return "lo" if "lo" in names else names[0]
