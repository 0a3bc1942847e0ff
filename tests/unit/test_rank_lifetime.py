"""A spawned rank does not outlive its launcher: killed launcher, SIGTERM to the rank, whose
cleanup (``finally`` blocks, temporary outputs) then runs."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path


def _rank(parent: int, folder: str) -> None:
    from vlm_bridge.parallel import die_with, stop_on_signals

    stop_on_signals()
    die_with(parent)
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


def test_a_stop_wrapped_by_a_library_is_still_one_line(monkeypatch, capsys, tmp_path):
    """torch's checkpoint writer re-raises an interruption as its own BaseException; the CLI still
    reports the stop in one line with the signal's exit code."""
    from vlm_bridge import cli, parallel

    class WriterFailure(BaseException):  # as torch.distributed.checkpoint.api.CheckpointException
        pass

    def interrupted_write(args):
        monkeypatch.setattr(parallel, "_STOPPED_BY", signal.SIGTERM)
        raise WriterFailure("ranks: [0]")

    monkeypatch.setitem(cli.COMMANDS, "export", interrupted_write)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        code = cli.main(["export", "--megatron-path", str(tmp_path), "--hf-path", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert code == 143 and capsys.readouterr().err.strip() == "terminated"
