"""Tensor bytes written to their file on a background thread, in order, while the next tensors are
converted: the write system call (a copy into the page cache, throttled to the disk's pace) then
overlaps the conversion's own copies instead of taking turns with them.

At most ``limit`` bytes of tensors are queued (a memory-mapped tensor costs no memory, a converted
one does, until it is written); a failed write is raised by the next call."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import torch

WRITE_BEHIND_BYTES = 256 * 1024**2


class WriteBehind:
    def __init__(self, limit: int = WRITE_BEHIND_BYTES) -> None:
        self.limit = limit
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._queued = 0
        self._room = threading.Condition()

    def write(self, file: BinaryIO, tensor: torch.Tensor) -> None:
        """Queue ``tensor``'s bytes (a contiguous CPU tensor) to be written at ``file``'s position
        after everything queued before it."""
        self._raise_failures()
        nbytes = tensor.nbytes
        with self._room:  # a tensor larger than the limit waits for an empty queue
            self._room.wait_for(lambda: self._queued == 0 or self._queued + nbytes <= self.limit)
            self._queued += nbytes
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="write-behind")
        self._pending.append(self._pool.submit(self._write, file, tensor, nbytes))

    def _write(self, file: BinaryIO, tensor: torch.Tensor, nbytes: int) -> None:
        try:
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        finally:
            with self._room:
                self._queued -= nbytes
                self._room.notify_all()

    def _raise_failures(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def wait(self) -> None:
        """Return once everything queued is written; raise the first failed write."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for the queued writes and stop the thread (errors are the caller's to ``wait`` for)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()
