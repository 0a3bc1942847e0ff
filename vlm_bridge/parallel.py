"""Process-group set-up and launching: one place that knows torchrun, gloo/NCCL and Megatron's mpu.

Every command that builds a Megatron model runs inside :func:`run_parallel`: under ``torchrun`` it
uses the launched processes; otherwise it spawns ``tp * pp * ...`` local processes itself, so
``vlm-bridge import --tp 2`` works from a plain shell as well.

Spawning costs a fresh interpreter per rank and call (importing torch and Megatron-Core takes many
seconds), which dominates short runs such as the test suite. A :class:`WorkerPool` keeps ranks alive
between calls instead: install one with :func:`use_worker_pool` and every ``run_parallel`` call that
fits in it runs there, single-rank calls included, so the caller's process never initialises
torch.distributed, Megatron's global state or the CPU compatibility layer itself.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import pickle
import queue as queue_module
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlm_bridge.compat.cpu import cpu_compat, cpu_compat_active, cuda_available

_RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout of a run. Data parallelism takes whatever world size is left."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1  # context parallelism: each rank holds a share of every sequence

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def conversion_world_size(self) -> int:
        """Ranks a conversion or verify run uses: CP ranks, and experts split over ``ep`` of the
        data-parallel x context-parallel ranks."""
        return self.tp * self.pp * max(self.ep, self.cp)

    def validate(self) -> None:
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if max(self.ep, self.cp) % min(self.ep, self.cp):
            raise ValueError(f"--ep {self.ep} and --cp {self.cp}: one must divide the other")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Initialise torch.distributed (from env vars) and Megatron's model-parallel groups.

    Without CUDA this must run inside :func:`run_parallel` (or a ``with cpu_compat():`` block), which
    makes Megatron-Core usable on the CPU for the duration of the run.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not cuda_available() and not cpu_compat_active():
        raise RuntimeError(
            "init_distributed without CUDA needs the CPU compatibility layer: "
            "call inside run_parallel or `with cpu_compat():`"
        )
    if not dist.is_initialized():
        backend = "nccl" if cuda_available() else "gloo"
        if cuda_available():
            if parallel.tp > 1:
                # Megatron's TP linears overlap the input-gradient all-reduce with the weight
                # gradient GEMM only when the GPU runs kernels in launch order (one hardware
                # queue); it must be set before this process's CUDA context exists.
                os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    if world % (parallel.model_parallel_size * parallel.cp):
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {parallel.model_parallel_size * parallel.cp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        context_parallel_size=parallel.cp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    global _CPU_GROUP
    # Host-side transfers (exported tensors, reports) go over gloo whatever the device backend.
    _CPU_GROUP = dist.new_group(backend="gloo") if cuda_available() else dist.group.WORLD


_CPU_GROUP = None


def cpu_group():
    """A process group over all ranks that carries CPU tensors (gloo)."""
    return _CPU_GROUP


def device() -> torch.device:
    """Where this rank's model lives."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside Megatron's wrappers (DDP, Float16Module)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def host_to_device(t: torch.Tensor, target: torch.device) -> torch.Tensor:
    """``t.to(target)``; from the host to a GPU through pinned memory, asynchronously: a copy from
    pageable memory first waits for the GPU to finish all queued work. The moved tensor remembers
    its host original for :func:`on_host`."""
    if t.device.type == "cpu" and torch.device(target).type == "cuda":
        # pin_memory refuses a tensor whose elements share memory (an expanded mask), so a
        # non-contiguous tensor is pinned as a contiguous copy (a no-op for the usual batch).
        moved = t.contiguous().pin_memory().to(target, non_blocking=True)
        moved._host_original = t
        return moved
    return t.to(target)


def on_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host for index work (grids, sizes): a copy of the host original of a tensor that
    :func:`host_to_device` moved, without waiting for the GPU; ``t.cpu()`` otherwise, which waits
    until every queued kernel has run, so the GPU then idles while the host catches up."""
    original = getattr(t, "_host_original", None)
    if original is not None and os.environ.get("VLM_BRIDGE_HOST_ORIGINALS", "1") != "0":
        return original.clone()
    return t.cpu()


def shutdown_distributed() -> None:
    """Tear down Megatron's groups, its RNG tracker and torch.distributed, even after a failed run.

    Every step is attempted; the first failure is re-raised at the end. Megatron's groups are
    destroyed unconditionally: a run that failed half-way through ``initialize_model_parallel``
    leaves some of them set while ``model_parallel_is_initialized()`` already says False, and the
    next initialisation in the same process would then refuse to start.
    """
    global _CPU_GROUP
    _CPU_GROUP = None
    errors: list[BaseException] = []
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception as exc:  # keep going: torch.distributed must still be torn down
        errors.append(exc)
    try:
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(force_reset=True)  # a fresh, empty tracker for the next run
    except Exception as exc:
        errors.append(exc)
    try:
        _reset_megatron_loss_scales()
    except Exception as exc:
        errors.append(exc)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:
        errors.append(exc)
    if errors:
        raise errors[0]


def _reset_megatron_loss_scales() -> None:
    """Megatron keeps auxiliary-loss gradient scales (MoE, MTP) and MoE logging state as process
    globals that a training step sets; a later run in the same (pool) process must not inherit
    them (a stale MoE scale changes every router gradient)."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)  # its class default
    moe_utils.get_moe_layer_wise_logging_tracker().clear()


def _error_text(exc: BaseException) -> str:
    # User errors (ValueError and subclasses) carry their own one-line message.
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


@dataclass
class _Outcome:
    """What a rank reports to the launching process."""

    ok: bool
    result: Any = None
    message: str = ""
    traceback: str = ""
    user_error: bool = False  # bad values (ValueError, CheckpointError) or paths (OSError)
    peer_failure: bool = False  # the rank only saw another rank go away
    clean: bool = True  # (pool) the worker is fit for another job

    @classmethod
    def error(cls, exc: BaseException) -> _Outcome:
        return cls(False, message=_error_text(exc), traceback=traceback.format_exc(),
                   user_error=isinstance(exc, (ValueError, OSError)), peer_failure=_is_peer_failure(exc))


def _is_peer_failure(exc: BaseException) -> bool:
    """An error a rank gets because another rank failed first (its socket closed mid-collective)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or "closed by peer" in text or "reset by peer" in text


def _root_cause(outcomes: list[_Outcome]) -> _Outcome | None:
    """The error to report: the first one that is not just a rank losing its peer."""
    errors = [o for o in outcomes if not o.ok]
    return min(errors, key=lambda o: o.peer_failure, default=None)


def _run_rank(fn: Callable, args: tuple) -> tuple:
    """One rank's share of a run: ``fn`` under the CPU layer, then a full shutdown, whatever happened.

    Never raises: failures are reported in the outcome.
    """
    try:
        with cpu_compat():
            try:
                result = fn(*args)
            finally:
                shutdown_distributed()
        return _Outcome(True, result)
    except BaseException as exc:  # reported to the parent, which re-raises with the message
        return _Outcome.error(exc)


def _pickle_job(fn: Callable, args: tuple) -> bytes:
    """``(fn, args)`` as plain pickle bytes, read by every rank. Not multiprocessing's pickler: its
    shared-memory handles for tensors can be opened by one receiver only."""
    return pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}


_STOPPED_BY: int | None = None  # the signal that asked this process to stop, once one has


def stop_on_signals() -> None:
    """SIGTERM (``kill``, ``timeout``, a scheduler) ends this process as Ctrl-C would: an exception,
    so that every ``finally`` and context manager runs and no half-written output is left. Either
    signal is also remembered (:func:`stopped_by`): an exception raised where Python swallows it
    (a finaliser) or that a library wraps in its own still stops the run at its next
    :func:`raise_if_stopped`, and the CLI still reports an interruption."""
    def stop(signum: int, frame: Any) -> None:
        global _STOPPED_BY
        _STOPPED_BY = signum
        _raise_stop(signum)

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, stop)


def stopped_by() -> int | None:
    return _STOPPED_BY


def raise_if_stopped() -> None:
    """Stop here if a stop signal arrived and its exception was lost on the way."""
    if _STOPPED_BY is not None:
        _raise_stop(_STOPPED_BY)


def _raise_stop(signum: int) -> None:
    """Ctrl-C's exception for SIGINT; for SIGTERM an exit with the shell's code for it."""
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def die_with(parent: int) -> None:
    """Ask the kernel for a SIGTERM when the launching process dies (Linux), so that no rank lives
    on, and publishes its output, after its launcher was killed."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made
        raise SystemExit(128 + signal.SIGTERM)


def _worker(rank: int, world: int, port: int, job: bytes, errors: Any, parent: int | None = None) -> None:
    """Target of a freshly spawned rank. ``job`` is the pickled ``(fn, args)``: unpickling it imports
    the caller's modules (and Megatron), which must happen after the warning filters are set. The
    launcher decides what Ctrl-C does (it stops the ranks with SIGTERM); a rank also stops when its
    launcher dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_on_signals()
    if parent is not None:
        die_with(parent)
    from vlm_bridge.logging_setup import quiet_third_party_warnings

    quiet_third_party_warnings()
    os.environ.update(_rank_env(rank, world, port))
    try:
        fn, args = pickle.loads(job)
    except BaseException as exc:
        outcome = _Outcome.error(exc)
    else:
        outcome = _run_rank(fn, args)
    if rank != 0:
        outcome.result = None
    errors.put(outcome)


class RankError(RuntimeError):
    """An error raised on one of the ranks, re-raised in the launching process.

    ``remote_traceback`` holds the rank's formatted traceback when there is one (it is also chained
    as the ``__cause__``, so pytest and the interpreter print it). ``user_error`` says the rank failed
    on bad input (a ValueError such as CheckpointError, or an OSError) rather than on a bug or a
    crash; the CLI reports the former as a usage error.
    """

    def __init__(self, message: str, remote_traceback: str | None = None, user_error: bool = False) -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback
        self.user_error = user_error


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


def _raise_rank_error(message: str, tb: str | None = None, user_error: bool = False) -> None:
    if tb and os.environ.get("VLM_BRIDGE_DEBUG"):
        print(tb)
    error = RankError(message, tb, user_error)
    if tb:
        raise error from _RemoteTraceback(tb)
    raise error


def _raise_for_failures(outcomes: list[_Outcome], exits: dict[int, int | None]) -> None:
    """Raise the run's :class:`RankError`, if any: a rank process that died comes first (the other
    ranks' errors are then usually their lost connection to it), else the root-cause rank error."""
    cause = _root_cause(outcomes)
    if exits:
        died = ", ".join(f"rank {r}: {_exit_description(c)}" for r, c in sorted(exits.items()))
        message = f"a worker process died ({died})"
        if cause is not None:
            message += f"; first rank error: {(cause.message.splitlines() or [''])[0]}"
        _raise_rank_error(message, cause.traceback if cause else None)
    if cause is not None:
        _raise_rank_error(cause.message, cause.traceback, cause.user_error)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "killed after another rank died"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# --- worker pool -----------------------------------------------------------------------------

# After one rank of a job died, how long the others get to report before they are killed: a rank
# blocked in a collective with the dead one normally fails at once (gloo sees the closed socket).
_DEAD_RANK_GRACE_S = 60.0


def _worker_is_clean() -> bool:
    """Whether a pool worker is fit for another job after finishing one."""
    from megatron.core import parallel_state

    return not (dist.is_initialized() or parallel_state.model_parallel_is_initialized()
                or cpu_compat_active() or torch.overrides._get_current_function_mode_stack())


def _pool_worker(conn: Any) -> None:
    """Main loop of a pool process: import once, then run jobs until told to stop or orphaned.

    Each job runs with the caller's environment, working directory and ``sys.path`` (what a freshly
    spawned rank would have inherited), plus the rank variables; all three are restored afterwards.
    """
    # A process group of its own: when this worker dies without cleaning up, the pool can still
    # reach what it started (Megatron's checkpoint code keeps a multiprocessing Manager server for
    # the life of the process). It also keeps the terminal's Ctrl-C away from the worker; the
    # parent decides what happens to a running job (and ignoring SIGINT covers a shared group).
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from vlm_bridge.logging_setup import quiet_third_party_warnings

    quiet_third_party_warnings()
    import megatron.core.parallel_state  # noqa: F401  (the slow imports, paid once per worker)
    import megatron.core.tensor_parallel  # noqa: F401

    # The imports leave a few hundred thousand objects that live as long as the worker. Frozen, the
    # collection after each job visits only what jobs made: 0.2 s less per job on a 2-core machine.
    gc.freeze()
    base_env, base_cwd, base_path = dict(os.environ), os.getcwd(), list(sys.path)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        rank, world, port, env, cwd, path, blob = job
        try:
            os.environ.clear()
            os.environ.update(env)
            os.environ.update(_rank_env(rank, world, port))
            os.chdir(cwd)
            sys.path[:] = path + [p for p in base_path if p not in path]
            fn, args = pickle.loads(blob)
        except BaseException as exc:
            outcome = _Outcome.error(exc)
        else:
            outcome = _run_rank(fn, args)
            del fn, args
        os.environ.clear()
        os.environ.update(base_env)
        os.chdir(base_cwd)
        sys.path[:] = base_path
        # Process-wide torch switches a job may leave flipped; a fresh rank would start with these.
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        if rank != 0:
            outcome.result = None
        del job, blob
        gc.collect()  # the job's model and tensors, before the worker idles
        # What outlived the job (modules it imported, caches) is not walked again; a cycle among
        # those that later turns to garbage stays: a worker that runs jobs, not a training run.
        gc.freeze()
        outcome.clean = clean = _worker_is_clean()
        try:
            conn.send(outcome)
        except (EOFError, OSError):
            return
        except Exception as exc:  # the result itself does not pickle
            failed = _Outcome.error(exc)
            failed.message = f"rank {rank} could not send its result back: {failed.message}"
            failed.clean = clean
            conn.send(failed)
        del outcome
        if not clean:
            return  # the pool starts a fresh worker in this slot


@dataclass
class _Slot:
    process: Any
    conn: Any
    jobs: int = 0


class WorkerPool:
    """``size`` long-lived spawn-context processes that run :func:`run_parallel` jobs as ranks.

    Each worker imports torch and Megatron-Core once, then runs jobs one after another; rank ``r``
    of a job always goes to worker ``r``. Every job ends with a full ``shutdown_distributed`` and
    the CPU layer undone, so jobs of different layouts can follow each other. A worker that dies is
    reported as a :class:`RankError` naming its exit code and replaced by a fresh one; a worker that
    is left in a state it cannot clean up exits after reporting and is replaced too.

    Workers are not daemonic: Megatron's checkpoint writer may start processes of its own.
    Workers start when :meth:`start` is called, or on the first job that needs them.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.size = size
        self._ctx = mp.get_context("spawn")
        self._slots: list[_Slot | None] = [None] * size
        self._closed = False
        self._atexit_registered = False
        self._lock = threading.Lock()  # one job at a time: every job uses workers from 0 up

    def start(self) -> WorkerPool:
        """Start every worker now (their imports overlap with whatever the caller does next)."""
        for i in range(self.size):
            self._ensure(i)
        return self

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _ensure(self, i: int) -> _Slot:
        if self._closed:
            raise RuntimeError("this worker pool has been shut down")
        slot = self._slots[i]
        if slot is not None and slot.process.is_alive():
            return slot
        if slot is not None:
            self._discard(i)
        if not self._atexit_registered:
            atexit.register(self.shutdown)  # non-daemonic workers would otherwise block exit
            self._atexit_registered = True
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_pool_worker, args=(child_conn,), daemon=False,
                                    name=f"vlm-bridge-pool-{i}")
        process.start()
        child_conn.close()
        slot = self._slots[i] = _Slot(process, parent_conn)
        return slot

    def _discard(self, i: int) -> None:
        slot, self._slots[i] = self._slots[i], None
        if slot is None:
            return
        if slot.process.is_alive():
            slot.process.terminate()
        slot.process.join(timeout=10)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        slot.conn.close()
        if hasattr(os, "killpg"):
            # Whatever the worker left behind in its process group (it is the group leader).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(slot.process.pid, signal.SIGTERM)

    def shutdown(self) -> None:
        """Stop every worker: idle ones exit on their own, one that never ran a job (maybe still
        importing) or does not stop within a few seconds is terminated."""
        for slot in self._slots:
            if slot is not None and slot.jobs:
                with contextlib.suppress(OSError, ValueError):
                    slot.conn.send(None)
        deadline = time.monotonic() + 5.0
        for i, slot in enumerate(self._slots):
            if slot is not None:
                if slot.jobs:
                    slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
                self._discard(i)
        self._closed = True
        atexit.unregister(self.shutdown)

    def run(self, fn: Callable, world_size: int, *args: Any) -> Any:
        """Run ``fn(*args)`` on ranks ``0..world_size-1`` of the pool; return rank 0's result."""
        if not 1 <= world_size <= self.size:
            raise ValueError(f"world size {world_size} does not fit a pool of {self.size} workers")
        with self._lock:
            return self._run(fn, world_size, args)

    def _run(self, fn: Callable, world_size: int, args: tuple) -> Any:
        # Pickle once, before any rank starts: an argument that does not pickle fails here instead
        # of leaving the other ranks waiting for a peer.
        blob = _pickle_job(fn, args)
        env, cwd, path = dict(os.environ), os.getcwd(), list(sys.path)
        port = _free_port()
        ranks = range(world_size)
        try:
            for r in ranks:
                slot = self._ensure(r)
                slot.jobs += 1
                slot.conn.send((r, world_size, port, env, cwd, path, blob))
            outcomes, exits = self._collect(world_size)
        except BaseException:
            # Interrupted (or the pipe broke): the ranks' state is unknown; replace them.
            for r in ranks:
                self._discard(r)
            raise
        for r in ranks:
            # Dead, killed, or exited after an unclean job: a fresh worker starts importing now.
            if r in exits or not outcomes[r].clean:
                self._discard(r)
                self._ensure(r)
        _raise_for_failures(list(outcomes.values()), exits)
        return outcomes[0].result

    def _collect(self, world_size: int) -> tuple[dict[int, _Outcome], dict[int, int | None]]:
        """Read every rank's report as it arrives (a large result would otherwise block its sender)
        and notice ranks that die. Returns the reports in arrival order and the dead ranks' exit
        codes (None for a rank killed here after waiting on a dead peer)."""
        slots = {r: self._slots[r] for r in range(world_size)}
        outcomes: dict[int, _Outcome] = {}
        exits: dict[int, int | None] = {}
        deadline = None
        while len(outcomes) + len(exits) < world_size:
            pending = {r: s for r, s in slots.items() if r not in outcomes and r not in exits}
            waitables = [s.conn for s in pending.values()] + [s.process.sentinel for s in pending.values()]
            connection.wait(waitables, timeout=1.0)
            for r, slot in pending.items():
                if slot.conn.poll():
                    try:
                        outcomes[r] = slot.conn.recv()
                        continue
                    except (EOFError, OSError):
                        slot.process.join(timeout=5)  # died (maybe while sending): let it finish
                if not slot.process.is_alive():
                    slot.process.join()
                    exits[r] = slot.process.exitcode
            if exits and len(outcomes) + len(exits) < world_size:
                deadline = deadline or time.monotonic() + _DEAD_RANK_GRACE_S
                if time.monotonic() > deadline:
                    for r in slots:
                        if r not in outcomes and r not in exits:
                            exits[r] = None
        return outcomes, exits


_ACTIVE_POOL: WorkerPool | None = None


def active_worker_pool() -> WorkerPool | None:
    """The pool :func:`run_parallel` uses, if any."""
    return _ACTIVE_POOL


class _PoolInstallation(contextlib.AbstractContextManager):
    """Returned by :func:`use_worker_pool`; leaving it as a ``with`` block reinstates the previous pool."""

    def __init__(self, pool: WorkerPool | None, previous: WorkerPool | None) -> None:
        self.pool, self.previous = pool, previous

    def __enter__(self) -> WorkerPool | None:
        return self.pool

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE_POOL
        _ACTIVE_POOL = self.previous


def use_worker_pool(pool: WorkerPool | None) -> _PoolInstallation:
    """Make ``run_parallel`` send every job that fits to ``pool`` (None: spawn again).

    Takes effect at once; used as a context manager it also restores the previous pool on exit.
    The pool is not started or shut down here.
    """
    global _ACTIVE_POOL
    previous, _ACTIVE_POOL = _ACTIVE_POOL, pool
    return _PoolInstallation(pool, previous)


def _run_in_process(fn: Callable, args: tuple) -> Any:
    os.environ.update(_rank_env(0, 1, _free_port()))
    try:
        with cpu_compat():
            try:
                return fn(*args)
            finally:
                shutdown_distributed()
    finally:
        for key in _RANK_ENV:
            os.environ.pop(key, None)


def _run_spawned(fn: Callable, world_size: int, args: tuple) -> Any:
    job = _pickle_job(fn, args)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, job, queue, os.getpid()), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    # Drain the queue while the ranks run: a large result would otherwise block its sender
    # (and the join below) until someone reads the pipe.
    messages = []
    try:
        while len(messages) < world_size:
            try:
                messages.append(queue.get(timeout=1.0))
            except queue_module.Empty:
                if not any(p.is_alive() for p in procs):
                    while not queue.empty():
                        messages.append(queue.get_nowait())
                    break
    except BaseException:  # Ctrl-C or SIGTERM here: the ranks clean up and stop before we do
        _stop(procs)
        raise
    for p in procs:
        p.join()
    _raise_for_failures(messages, {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0})
    return next((m.result for m in messages if m.result is not None), None)


def _stop(procs: list, grace: float = 60.0) -> None:
    """SIGTERM to every live rank, time to remove what it was writing, then SIGKILL."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_parallel(fn: Callable, world_size: int, *args: Any) -> Any:
    """Run ``fn(*args)`` on ``world_size`` ranks and return rank 0's result.

    Under torchrun (``WORLD_SIZE`` set) the current process is one rank and runs ``fn`` directly.
    Otherwise the job goes to the active :class:`WorkerPool` when it fits; without one a single rank
    runs in-process and several ranks are spawned. Every rank runs inside :func:`cpu_compat` (a
    no-op with CUDA). A rank error is re-raised here as a :class:`RankError` carrying the original
    one-line message (in-process runs raise the original exception).
    """
    if "WORLD_SIZE" in os.environ:
        # torchrun keeps the process group for the life of the process; so do we.
        with cpu_compat():
            return fn(*args)
    pool = _ACTIVE_POOL
    if pool is not None and world_size <= pool.size:
        return pool.run(fn, world_size, *args)
    if world_size == 1:
        return _run_in_process(fn, args)
    return _run_spawned(fn, world_size, args)
