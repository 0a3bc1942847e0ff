"""Where a step makes the host wait for the GPU (torch's CUDA sync debug mode, by calling frame).

A waiting host stops queueing kernels, and the GPU idles until the host catches up; the benchmark
reports these and a GPU test asserts that a training micro-batch has none.
"""

from __future__ import annotations

import collections
import traceback
import warnings
from collections.abc import Callable

import torch

_PROJECT_FRAMES = ("vlm_bridge", "megatron", "benchmarks")


def host_waits(step: Callable[[], object], frames: int = 4) -> collections.Counter:
    """Run ``step`` once; count every synchronising operation by its innermost ``frames`` project
    or Megatron frames (``file:line function <- ...``). Empty without CUDA."""
    where: collections.Counter = collections.Counter()
    if not torch.cuda.is_available():
        return where

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing CUDA operation" not in str(message):  # not the mode's own notice
            return
        stack = [f"{f.filename.split('site-packages/')[-1].rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                 for f in traceback.extract_stack()[:-1] if any(p in f.filename for p in _PROJECT_FRAMES)]
        where[" <- ".join(reversed(stack[-frames:]))] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return where
