"""run_parallel's worker pool and the scoped CPU compatibility layer.

The pool keeps ranks alive between jobs, so what must hold is isolation: a job of one layout after
another, after a failing job or after a worker that died, starts from a clean process; and the
caller's own process is left with stock torch after any run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vlm_bridge.compat.cpu import cpu_compat, cpu_compat_active, cuda_available
from vlm_bridge.parallel import (
    ParallelConfig,
    RankError,
    WorkerPool,
    active_worker_pool,
    init_distributed,
    run_parallel,
    use_worker_pool,
)

RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.fixture(scope="module")
def pool():
    """The session's pool when it has two workers, else one of this module's own."""
    session = active_worker_pool()
    if session is not None and session.size >= 2:
        yield session
        return
    with WorkerPool(2) as own, use_worker_pool(own):
        yield own


def _layout(parallel: ParallelConfig) -> dict:
    from megatron.core import parallel_state as ps

    init_distributed(parallel)
    t = torch.ones(1)
    dist.all_reduce(t)
    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "sum": float(t), "pid": os.getpid(),
            "compat": cpu_compat_active() or cuda_available()}


def _fail(parallel: ParallelConfig, message: str) -> None:
    init_distributed(parallel)
    if dist.get_rank() == dist.get_world_size() - 1:
        raise ValueError(message)
    dist.barrier()  # the failing rank's peers wait on it, as in a real run


def _die(code: int) -> None:
    init_distributed(ParallelConfig())
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(code)
    dist.barrier()


def test_consecutive_layouts_reuse_the_workers(pool):
    tp2 = run_parallel(_layout, 2, ParallelConfig(tp=2))
    pp2 = run_parallel(_layout, 2, ParallelConfig(pp=2))
    one = run_parallel(_layout, 1, ParallelConfig())
    assert (tp2["world"], tp2["tp"], tp2["pp"], tp2["sum"]) == (2, 2, 1, 2.0)
    assert (pp2["world"], pp2["tp"], pp2["pp"], pp2["sum"]) == (2, 1, 2, 2.0)
    assert (one["world"], one["tp"], one["pp"], one["sum"]) == (1, 1, 1, 1.0)
    assert tp2["pid"] == pp2["pid"] == one["pid"] != os.getpid()  # rank 0 is always worker 0
    assert tp2["compat"] and one["compat"]
    # The caller's process took no part: no process group, no rank variables, stock torch.
    assert not dist.is_initialized() and not cpu_compat_active()
    assert not any(key in os.environ for key in RANK_ENV)


def test_a_failing_job_does_not_poison_the_next(pool):
    with pytest.raises(RankError, match="^bad input on the last rank$") as info:
        run_parallel(_fail, 2, ParallelConfig(tp=2), "bad input on the last rank")
    assert info.value.user_error and "ValueError" in info.value.remote_traceback
    # Megatron refuses a layout that does not divide after torch.distributed is up: the next job
    # must still find neither a process group nor model-parallel state left behind.
    with pytest.raises(RankError, match="not divisible"):
        run_parallel(_layout, 2, ParallelConfig(tp=3))
    assert run_parallel(_layout, 1, ParallelConfig())["world"] == 1
    assert run_parallel(_layout, 2, ParallelConfig(pp=2))["pp"] == 2


_LEFT_BY_LAST_JOB: list = []


class _Cycle:
    """Garbage in a reference cycle, as a job's model and its hooks leave it."""

    def __init__(self) -> None:
        self.me, self.weights = self, torch.zeros(1000)


def _watch(node: _Cycle) -> int:
    """Keep a weak reference to the job's argument (dropped with the job) in the worker."""
    import gc
    import weakref

    _LEFT_BY_LAST_JOB.append(weakref.ref(node))
    return gc.get_freeze_count()


def _cycle_left_alive() -> bool:
    return any(ref() is not None for ref in _LEFT_BY_LAST_JOB)


def test_workers_collect_each_jobs_cycles_and_skip_their_own_imports(pool):
    """Workers freeze what outlives their imports and jobs, so the collection after a job walks only
    what that job made (it walked the whole torch + Megatron heap, 0.2 s a job); the job's own
    cyclic garbage is still freed."""
    frozen = run_parallel(_watch, 1, _Cycle())
    assert frozen > 10_000
    assert run_parallel(_cycle_left_alive, 1) is False


def test_a_dead_worker_is_reported_and_replaced(pool):
    with pytest.raises(RankError, match=r"rank 1: exit code 3") as info:
        run_parallel(_die, 2, 3)
    assert not info.value.user_error
    assert run_parallel(_layout, 2, ParallelConfig(tp=2))["sum"] == 2.0
    with pytest.raises(RankError, match=r"rank 0: exit code 4"):
        run_parallel(_die, 1, 4)
    assert run_parallel(_layout, 1, ParallelConfig())["world"] == 1


def _die_leaving_a_child(pid_file: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    Path(pid_file).write_text(str(child.pid))
    os._exit(7)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.skipif(not Path("/proc").is_dir() or not hasattr(os, "killpg"), reason="needs Linux")
def test_a_dead_workers_children_do_not_outlive_it(pool, tmp_path):
    """Megatron's checkpoint writer leaves a Manager process in each worker; a crash must not orphan it."""
    with pytest.raises(RankError, match=r"rank 0: exit code 7"):
        run_parallel(_die_leaving_a_child, 1, str(tmp_path / "pid"))
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid)


def test_jobs_see_the_callers_environment(pool, monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_BRIDGE_TEST_MARKER", "set-by-caller")
    monkeypatch.chdir(tmp_path)
    env, cwd = run_parallel(_env_and_cwd, 2)
    assert env == "set-by-caller" and cwd == str(tmp_path)
    monkeypatch.delenv("VLM_BRIDGE_TEST_MARKER")
    assert run_parallel(_env_and_cwd, 2)[0] is None


def _env_and_cwd() -> tuple:
    return os.environ.get("VLM_BRIDGE_TEST_MARKER"), os.getcwd()


def _patched_objects() -> dict:
    from megatron.core.tensor_parallel import random as mrandom
    from torch.autograd.function import BackwardCFunction

    return {"current_device": torch.cuda.current_device, "synchronize": torch.cuda.synchronize,
            "Stream": torch.cuda.Stream, "manual_seed": torch.cuda.manual_seed,
            "get_rng": mrandom._get_cuda_rng_state, "set_rng": mrandom._set_cuda_rng_state,
            "all_to_all_single": dist.all_to_all_single, "apply": BackwardCFunction.apply}


def _compat_inside() -> bool:
    init_distributed(ParallelConfig())
    return cpu_compat_active() and bool(torch.overrides._get_current_function_mode_stack())


@pytest.mark.skipif(cuda_available(), reason="the layer is a no-op with CUDA")
def test_in_process_run_restores_torch():
    before = _patched_objects()
    with use_worker_pool(None):  # world 1 without a pool: runs in this very process
        assert run_parallel(_compat_inside, 1)
    after = _patched_objects()
    assert [name for name in before if after[name] is not before[name]] == []
    assert torch.overrides._get_current_function_mode_stack() == []
    assert not cpu_compat_active() and not dist.is_initialized()
    assert not any(key in os.environ for key in RANK_ENV)
    assert torch.zeros(1, device="cpu").to("cpu").device.type == "cpu"


@pytest.mark.skipif(cuda_available(), reason="the layer is a no-op with CUDA")
def test_cpu_compat_nests_and_init_distributed_demands_it():
    original = torch.cuda.current_device
    with cpu_compat() as outer:
        with cpu_compat() as inner:
            assert outer and inner and torch.cuda.current_device() == 0
        assert cpu_compat_active() and torch.cuda.current_device is not original  # outer still open
    assert not cpu_compat_active() and torch.cuda.current_device is original
    with pytest.raises(RuntimeError, match="inside run_parallel or `with cpu_compat"):
        init_distributed(ParallelConfig())


def test_on_host_reads_the_host_original_of_a_moved_tensor(monkeypatch):
    """Index work on a tensor that ``host_to_device`` moved reads a copy of its host original (a
    GPU copy back would wait for every queued kernel); other tensors are copied as usual."""
    import torch

    from vlm_bridge.parallel import on_host

    grid = torch.tensor([[1, 4, 6]])
    moved = grid * 1  # stands for the device copy
    moved._host_original = grid
    got = on_host(moved)
    assert torch.equal(got, grid) and got.data_ptr() != grid.data_ptr()  # a copy: callers may edit it
    monkeypatch.setenv("VLM_BRIDGE_HOST_ORIGINALS", "0")
    assert torch.equal(on_host(moved), moved)
    plain = torch.tensor([3])
    assert on_host(plain) is plain.cpu()


@pytest.mark.skipif(cuda_available(), reason="the layer is a no-op with CUDA")
def test_cpu_layer_drops_the_trackers_forked_rng_notice(caplog):
    """On the CPU the forked "CUDA" generator is the CPU one, so a dropout inside Megatron's fork
    always changes it: the tracker's notice would print once per adapter and micro-batch."""
    import logging

    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()  # not the process-wide one
    with cpu_compat(), caplog.at_level(logging.WARNING):
        tracker.add("notice-check", 7)
        with tracker.fork("notice-check"):
            torch.rand(3)
    assert "CPU RNG state changed" not in caplog.text
    logging.getLogger(mrandom.__name__).warning("CPU RNG state changed within GPU RNG context")
    assert "CPU RNG state changed" in caplog.text  # outside the layer it is Megatron's again
