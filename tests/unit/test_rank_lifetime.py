"""A spawned rank does not outlive its launcher: killed launcher, SIGTERM to the rank, whose
cleanup (``finally`` blocks, temporary outputs) then runs."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path


def _rank(parent: int, folder: str) -> None:
    from vlm_bridge.parallel import _die_with, exit_on_sigterm

    exit_on_sigterm()
    _die_with(parent)
    Path(folder, "ready").write_text("")
    try:
        time.sleep(120)
    finally:
        Path(folder, "cleaned").write_text("")


def _launcher(folder: str) -> None:
    rank = multiprocessing.get_context("spawn").Process(target=_rank, args=(os.getpid(), folder))
    rank.start()
    time.sleep(120)


def _wait_for(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.1)
    return False


def test_a_rank_stops_and_cleans_up_when_its_launcher_is_killed(tmp_path):
    launcher = multiprocessing.get_context("spawn").Process(target=_launcher, args=(str(tmp_path),))
    launcher.start()
    try:
        assert _wait_for(tmp_path / "ready", 120)
        os.kill(launcher.pid, signal.SIGKILL)  # as `kill -9`, a scheduler or an OOM killer would
        assert _wait_for(tmp_path / "cleaned", 30)
    finally:
        launcher.kill()
        launcher.join()
