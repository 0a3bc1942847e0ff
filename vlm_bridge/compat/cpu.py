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
when CUDA is absent: :func:`enable_cpu_compat` is a no-op on a GPU machine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_ENABLED = False


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


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0  # the mode maps device 0 to the CPU
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.Stream = _CpuStream  # type: ignore[misc,assignment]
    cuda.Event = _CpuStream  # type: ignore[misc,assignment]
    cuda.current_stream = lambda *a, **k: _CpuStream()
    cuda.default_stream = lambda *a, **k: _CpuStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.empty_cache = lambda *a, **k: None
    # "The CUDA generator" becomes the CPU generator, so Megatron's TP RNG tracker keeps its
    # meaning (independent streams per TP rank for dropout/init) instead of being disabled.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it: must not recurse


def _patch_megatron_rng() -> None:
    """Megatron's TP RNG tracker forks CUDA RNG states; on CPU fork the CPU generator instead."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_all_to_all_split_sizes() -> None:
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

    dist.all_to_all_single = all_to_all_single


def _run_custom_backwards_in_mode(mode: TorchFunctionMode) -> None:
    """A torch-function mode is off while its own handler runs, and ``torch.autograd.backward`` goes
    through the handler: custom ``autograd.Function`` backwards (Megatron's all-to-all allocates its
    output on ``torch.cuda.current_device()``) would run without it. Re-enter the mode around them."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        with mode:
            return original(self, *args)

    BackwardCFunction.apply = apply


def cuda_available() -> bool:
    """True when real CUDA devices are usable (and not forced off by VLM_BRIDGE_FORCE_CPU=1)."""
    if os.environ.get("VLM_BRIDGE_FORCE_CPU") == "1":
        return False
    return torch.cuda.is_available()


def enable_cpu_compat() -> bool:
    """Apply the CPU compatibility layer once per process when CUDA is absent.

    Returns True when the layer is (now) active, False on a CUDA machine.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if cuda_available():
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_all_to_all_split_sizes()
    mode = _CudaToCpuMode()
    _run_custom_backwards_in_mode(mode)
    mode.__enter__()  # stays on the mode stack for the life of the process
    _ENABLED = True
    return True
