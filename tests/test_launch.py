"""The local launcher: results in rank order, and no hang when a rank never finishes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from selfattention.launch import LaunchError, run_local


def _rank_and_size(offset: float):
    return dist.get_rank(), dist.get_world_size(), torch.full((2,), dist.get_rank() + offset)


def test_results_come_back_in_rank_order():
    results = run_local(_rank_and_size, 3, 0.5)
    assert [(rank, size) for rank, size, _ in results] == [(0, 3), (1, 3), (2, 3)]
    for rank, _, tensor in results:
        torch.testing.assert_close(tensor, torch.full((2,), rank + 0.5))


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        run_local(_rank_and_size, 0, 0.0)


def _sleep_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(60)
    return dist.get_rank()


def test_the_whole_run_times_out():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="2 ranks did not finish within 3 s"):
        run_local(_sleep_on_rank_one, 2, timeout=3)
    assert time.monotonic() - start < 20


def _both_fail_one_later():
    time.sleep(0.5 * (1 - dist.get_rank()))  # rank 1 fails at once, rank 0 half a second later
    raise ValueError(f"rank {dist.get_rank()} has bad input")


def test_a_peer_that_fails_shortly_after_reports_its_own_error():
    with pytest.raises(LaunchError) as error:
        run_local(_both_fail_one_later, 2, timeout=60)
    for rank in (0, 1):
        assert f"rank {rank} failed: ValueError: rank {rank} has bad input" in str(error.value)


def _rank_one_leaves_early():
    if dist.get_rank() == 1:
        raise SystemExit(0)
    return dist.get_rank()


def test_a_rank_that_exits_cleanly_without_a_result_is_a_launch_error():
    with pytest.raises(LaunchError, match=r"rank\(s\) \[1\] ended without an error but returned no result"):
        run_local(_rank_one_leaves_early, 2, timeout=60)


def _rank_one_ignores_sigterm_and_sleeps(marker: str):
    import os
    import signal

    if dist.get_rank() == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(marker, "w") as file:
            file.write(str(os.getpid()))
        time.sleep(60)
    return dist.get_rank()


def test_a_rank_that_ignores_sigterm_is_killed_before_the_launcher_returns(tmp_path):
    import os

    marker = tmp_path / "pid"
    with pytest.raises(LaunchError, match="did not finish within 3 s"):
        run_local(_rank_one_ignores_sigterm_and_sleeps, 2, str(marker), timeout=3)
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):  # gone (and reaped), not left running
        os.kill(pid, 0)


UNGUARDED_SCRIPT = """
import torch.distributed as dist
from selfattention.launch import run_local

def rank():
    return dist.get_rank()

print(run_local(rank, 2, timeout=60))
"""


def test_a_script_that_calls_the_launcher_at_its_top_level_is_told_to_guard_it(tmp_path):
    """Each rank imports the script's ``__main__`` to find the function; an unguarded call starts ranks again.

    Python's own message for that sits in the middle of a traceback inside each rank, and the launcher said
    only "process 0 terminated with exit code 1".
    """
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    guard = 'call it under `if __name__ == "__main__":`'
    assert f"RuntimeError: run_local was called while a rank was starting, from the script's top level: {guard}" in (
        done.stderr
    )
    last = done.stderr.strip().splitlines()[-2:]
    told = "rank 0 ended before running the function; if the script calls run_local at its top level, "
    assert last[0] == f"selfattention.launch.LaunchError: {told}{guard}"
    assert last[1] == "process 0 terminated with exit code 1"
    guarded = UNGUARDED_SCRIPT.replace("print(", 'if __name__ == "__main__":\n    print(')
    script.write_text(guarded)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "[0, 1]\n"), done.stderr
