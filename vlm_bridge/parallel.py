"""Process-group set-up and launching: one place that knows torchrun, gloo/NCCL and Megatron's mpu.

Every command that builds a Megatron model runs inside :func:`run_parallel`: under ``torchrun`` it
uses the launched processes; otherwise it spawns ``tp * pp * ...`` local processes itself, so
``vlm-bridge import --tp 2`` works from a plain shell as well.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlm_bridge.compat.cpu import cuda_available, enable_cpu_compat


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout of a run. Data parallelism takes whatever world size is left."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def conversion_world_size(self) -> int:
        """Ranks a conversion or verify run uses: experts are split over ``ep`` data-parallel ranks."""
        return self.tp * self.pp * self.ep

    def validate(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Initialise torch.distributed (from env vars) and Megatron's model-parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    enable_cpu_compat()
    if not dist.is_initialized():
        backend = "nccl" if cuda_available() else "gloo"
        if cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    if world % parallel.model_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by tp*pp = {parallel.model_parallel_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
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


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    global _CPU_GROUP
    _CPU_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, errors: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    try:
        result = fn(*args)
        errors.put(("ok", result if rank == 0 else None))
    except BaseException as exc:  # reported to the parent, which re-raises with the message
        # User errors (ValueError and subclasses) carry their own one-line message.
        text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        errors.put(("error", text, traceback.format_exc()))
    finally:
        shutdown_distributed()


def run_parallel(fn: Callable, world_size: int, *args: Any) -> Any:
    """Run ``fn(*args)`` on ``world_size`` ranks and return rank 0's result.

    Under torchrun (``WORLD_SIZE`` set) the current process is one rank and runs ``fn`` directly.
    Otherwise a single rank runs in-process and several ranks are spawned. The first rank error is
    re-raised here as a ``RuntimeError`` carrying the original one-line message.
    """
    if "WORLD_SIZE" in os.environ or world_size == 1:
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                LOCAL_RANK="0", WORLD_SIZE="1",
            )
            try:
                return fn(*args)
            finally:
                shutdown_distributed()
                for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
                    os.environ.pop(key, None)
        return fn(*args)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    # Drain the queue while the ranks run: a large result would otherwise block its sender
    # (and the join below) until someone reads the pipe.
    messages = []
    while len(messages) < world_size:
        try:
            messages.append(queue.get(timeout=1.0))
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs):
                while not queue.empty():
                    messages.append(queue.get_nowait())
                break
    for p in procs:
        p.join()
    result = None
    first_error = None
    for item in messages:
        if item[0] == "error" and first_error is None:
            first_error = item
        elif item[0] == "ok" and item[1] is not None:
            result = item[1]
    if first_error is not None:
        if os.environ.get("VLM_BRIDGE_DEBUG"):
            print(first_error[2])
        raise RankError(first_error[1])
    if any(p.exitcode != 0 for p in procs):
        raise RankError(f"a worker process died (exit codes {[p.exitcode for p in procs]})")
    return result


class RankError(RuntimeError):
    """An error raised on one of the spawned ranks, re-raised in the launching process."""
