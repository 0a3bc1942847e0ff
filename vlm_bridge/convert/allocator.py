"""Host-memory allocator settings for the conversion commands, applied before torch allocates.

Kept free of torch imports: torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first CPU allocation,
so the setting must be in place before torch is imported. Ranks spawned later inherit both
environment variables.
"""

from __future__ import annotations

import ctypes
import os

_MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def tune_allocator_for_conversion() -> None:
    """Freed tensor memory goes back to the system at once, and large tensors use huge pages.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which
    tensors of a few MB come from the heap, whose freed pages it keeps: converting a 7B model one
    tensor at a time then grew to 8.4 GB instead of staying under 1 GB between batches. A fixed
    threshold keeps every block above 128 KB its own mapping.

    Every such block is then fresh memory whose pages fault in on first write; with 4 KB pages
    that doubles the cost of a copy (0.34 s -> 0.19 s per GiB measured with huge pages). torch
    aligns blocks of 2 MB and more to huge pages and asks the kernel for them when
    ``THP_MEM_ALLOC_ENABLE`` is set (the kernel must allow ``madvise`` transparent huge pages).

    Conversion commands only: both cost page faults or memory on workloads that allocate and free
    large tensors in a loop (training).
    """
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(_MMAP_THRESHOLD_BYTES))
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
