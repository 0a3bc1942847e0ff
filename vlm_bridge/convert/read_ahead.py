"""Reading the bytes of the next tensors into the page cache while the current ones are converted.

Both conversions read their input through memory maps, one tensor at a time. From a cold page
cache (a checkpoint larger than memory, or one not read lately) each page fault reads only a
readahead window and waits for it, so reading and writing take turns. A background thread that
pulls the next few hundred MB into the page cache keeps the disk reading while the main thread
converts and writes. ``POSIX_FADV_WILLNEED`` would be the obvious hint, but Linux acts on it
for a readahead window per file only; ``sendfile`` to ``/dev/null`` makes the kernel read every
page of the range without copying it to user memory (and releases the GIL while it does).

The bytes land in the page cache, never in the process: resident memory is unchanged, and pages
that are not used in time are simply read again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

Span = tuple[Path, int, int]  # file, byte offset, length

# How far ahead of the tensor being converted the reads are queued.
READ_AHEAD_BYTES = 256 * 1024**2


def read_into_page_cache(spans: Iterable[Span]) -> None:
    """Have the kernel read each (file, offset, length) into the page cache; a span that cannot
    be read is skipped (the conversion that follows reads it itself and reports the problem)."""
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        for path, offset, length in spans:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                end = offset + length
                while offset < end:
                    sent = os.sendfile(sink, fd, offset, end - offset)
                    if sent <= 0:
                        break
                    offset += sent
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        os.close(sink)


class ReadAhead:
    """A background thread that reads queued spans into the page cache in order (each span once)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._queued: set[tuple[Path, int]] = set()

    @staticmethod
    def available() -> bool:
        return hasattr(os, "sendfile")  # Linux and macOS; elsewhere the kernel's own readahead

    def queue(self, spans: Iterable[Span]) -> None:
        new = [span for span in spans if (span[0], span[1]) not in self._queued]
        if not new or not self.available():
            return
        self._queued.update((path, offset) for path, offset, _ in new)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self._pool.submit(read_into_page_cache, new)

    def close(self, finish: bool = False) -> None:
        """Wait for the spans being read; the rest of the queue is dropped unless ``finish``."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=not finish)
            self._pool = None
