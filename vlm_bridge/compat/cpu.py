"""Let Megatron-Core run on a machine without CUDA (CPU tensors, gloo process groups).

Megatron-Core assumes CUDA in a handful of places that matter for our models:

* ``torch.cuda.current_device()`` used as a device (rotary ``inv_freq``, schedules, p2p buffers);
* literal ``device="cuda"`` / ``.cuda()`` in tensor factories (pipeline schedules, loss reductions);
* ``torch.cuda.synchronize()`` / streams / events around checkpoint writers and p2p;
* ``tensor.type() == 'torch.cuda.FloatTensor'`` assertions (gradient clipping);
* MoE all-to-all split sizes that stay tensors when nothing moves device-to-host.

Rather than patching those call sites one by one (they move between releases), a
``TorchFunctionMode`` rewrites any CUDA device argument to the CPU, and the few ``torch.cuda``
helpers that would raise are replaced by harmless CPU equivalents. Everything here is applied only
when CUDA is absent: :func:`cpu_compat` is a no-op on a GPU machine.

The layer is a context manager rather than a one-way switch because it rewrites torch for the whole
process: :func:`vlm_bridge.parallel.run_parallel` enters it around each rank's work and restores
every original object afterwards, so a test process, a notebook or a long-lived worker that runs
several jobs is left with a stock torch in between (and never sees CUDA calls silently turned into
CPU ones outside a run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "CUDA device N" to torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device arguments and ``Tensor.cuda()`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's grad clipping asserts grads are 'torch.cuda.FloatTensor'; report the
            # CUDA name for what would be on the GPU there.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` / ``Event``: every operation is already synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _CpuStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        # record_event(), wait_stream(), synchronize(), ...: chained calls keep working.
        return lambda *a, **k: _CpuStream()


_MISSING = object()


class _Patcher:
    """Sets attributes and remembers what was there, so :meth:`restore` can put it back exactly."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        # The owner's own __dict__, not getattr: a class attribute inherited from a base must be
        # deleted again on restore, not copied onto the subclass.
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def restore(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _patch_torch_cuda(p: _Patcher) -> None:
    cuda = torch.cuda
    p.set(cuda, "current_device", lambda: 0)  # the mode maps device 0 to the CPU
    p.set(cuda, "synchronize", lambda *a, **k: None)
    p.set(cuda, "set_device", lambda *a, **k: None)
    p.set(cuda, "device_count", lambda: 0)
    p.set(cuda, "Stream", _CpuStream)
    p.set(cuda, "Event", _CpuStream)
    p.set(cuda, "current_stream", lambda *a, **k: _CpuStream())
    p.set(cuda, "default_stream", lambda *a, **k: _CpuStream())
    p.set(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    p.set(cuda, "memory_allocated", lambda *a, **k: 0)
    p.set(cuda, "max_memory_allocated", lambda *a, **k: 0)
    p.set(cuda, "empty_cache", lambda *a, **k: None)
    # "The CUDA generator" becomes the CPU generator, so Megatron's TP RNG tracker keeps its
    # meaning (independent streams per TP rank for dropout/init) instead of being disabled.
    p.set(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    p.set(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    p.set(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    p.set(cuda, "manual_seed_all", lambda seed: None)  # torch.manual_seed calls it: must not recurse


class _ForkedCpuRngNotice(logging.Filter):
    """Drops the tracker's 'CPU RNG state changed within GPU RNG context': here the forked "CUDA"
    generator is the CPU one, so every dropout inside a fork changes it (one line per adapter and
    micro-batch otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng(p: _Patcher) -> None:
    """Megatron's TP RNG tracker forks CUDA RNG states; on CPU fork the CPU generator instead."""
    from megatron.core.tensor_parallel import random as mrandom

    p.set(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    p.set(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    logger = logging.getLogger(mrandom.__name__)
    p.set(logger, "filters", [*logger.filters, _ForkedCpuRngNotice()])


def _patch_all_to_all_split_sizes(p: _Patcher) -> None:
    """Megatron's MoE dispatcher moves split sizes to the host as numpy arrays on GPU; on CPU they
    stay tensors, which ``all_to_all_single`` rejects. Convert them to lists."""
    import torch.distributed as dist

    original = dist.all_to_all_single

    def as_list(sizes):
        return sizes.tolist() if hasattr(sizes, "tolist") else sizes

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          *args, **kwargs):
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes),
                        *args, **kwargs)

    p.set(dist, "all_to_all_single", all_to_all_single)


def _run_custom_backwards_in_mode(p: _Patcher, mode: TorchFunctionMode) -> None:
    """A torch-function mode is off while its own handler runs, and ``torch.autograd.backward`` goes
    through the handler: custom ``autograd.Function`` backwards (Megatron's all-to-all allocates its
    output on ``torch.cuda.current_device()``) would run without it. Re-enter the mode around them."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        with mode:
            return original(self, *args)

    p.set(BackwardCFunction, "apply", apply)


def cuda_available() -> bool:
    """True when real CUDA devices are usable (and not forced off by VLM_BRIDGE_FORCE_CPU=1)."""
    if os.environ.get("VLM_BRIDGE_FORCE_CPU") == "1":
        return False
    return torch.cuda.is_available()


class _State:
    """What an active layer holds: nesting depth, the patches to undo and the mode to pop."""

    lock = threading.Lock()
    depth = 0
    patcher: _Patcher | None = None
    mode: _CudaToCpuMode | None = None


def _activate() -> bool:
    """Apply the layer (or count one more nested user). False on a CUDA machine: nothing to do."""
    with _State.lock:
        if _State.depth:
            _State.depth += 1
            return True
        if cuda_available():
            return False
        patcher, mode = _Patcher(), _CudaToCpuMode()
        try:
            _patch_torch_cuda(patcher)
            _patch_megatron_rng(patcher)
            _patch_all_to_all_split_sizes(patcher)
            _run_custom_backwards_in_mode(patcher, mode)
            mode.__enter__()
        except BaseException:
            patcher.restore()
            raise
        _State.depth, _State.patcher, _State.mode = 1, patcher, mode
        return True


def _deactivate() -> None:
    with _State.lock:
        _State.depth -= 1
        if _State.depth:
            return
        patcher, mode = _State.patcher, _State.mode
        _State.patcher = _State.mode = None
        assert patcher is not None and mode is not None
        try:
            stack = torch.overrides._get_current_function_mode_stack()
            if not stack or stack[-1] is not mode:
                raise RuntimeError(
                    "cpu_compat exited while another torch function mode it did not push is on top "
                    "of the mode stack; exit that mode first"
                )
            mode.__exit__(None, None, None)
        finally:
            patcher.restore()


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """Let Megatron-Core run on the CPU for the duration of the block.

    On entry (when CUDA is absent) the ``torch.cuda`` helpers, Megatron's RNG-state helpers,
    ``dist.all_to_all_single`` and ``BackwardCFunction.apply`` are patched and a CUDA-to-CPU
    ``TorchFunctionMode`` is pushed; on exit every original object is put back and the mode popped.
    Nested blocks are counted: only the outermost one applies and undoes the patches. The mode is
    pushed in the entering thread only. Yields whether the layer is active (False on a CUDA machine,
    where the block changes nothing).
    """
    active = _activate()
    try:
        yield active
    finally:
        if active:
            _deactivate()


def cpu_mode_for_recompute() -> contextlib.AbstractContextManager:
    """The CUDA-to-CPU function mode again, for a layer that activation recomputation runs inside
    the backward, where the mode pushed by :func:`cpu_compat` is not on the stack (Megatron's MoE
    router moves its weight to CUDA there); a null context when the layer is off or CUDA exists."""
    return _CudaToCpuMode() if cpu_compat_active() else contextlib.nullcontext()


def cpu_compat_active() -> bool:
    """True while some :func:`cpu_compat` block is open in this process."""
    return _State.depth > 0
