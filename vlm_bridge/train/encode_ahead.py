"""Training samples encoded ahead of the stream in worker processes, so the processor's host work
(image decoding and resizing, normalisation, tokenisation) runs while the GPU trains instead of
between steps, spread over several cores.

The stream still decides everything: it asks for the sample at each position of its order exactly
as before. This only starts the encodings of the positions it will ask for next, in forked worker
processes (which inherit the encoder and the samples, as ``DataLoader`` workers do), and hands back
each result with the counts its encoding added (encoded, truncated, skipped by reason), which join
the stream encoder's counts when the stream takes that sample. Batches, data positions and counts
are those of encoding in the trainer's process (tested), and a sample's error is raised when the
stream reaches it, not when a worker meets it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

# What forked workers encode with: set in the trainer's process just before a pool forks them.
_ENCODER: Any = None
_SAMPLES: Any = None
_PREPARE: Any = None


def auto_workers() -> int:
    """``data.workers=-1``: none without CUDA (the cores train), else up to 4 per local rank, keeping
    one core of each rank's share of this machine's cores for the rank itself."""
    import torch

    if not torch.cuda.is_available():
        return 0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))  # torchrun sets it
    cores = len(os.sched_getaffinity(0)) // max(local_ranks, 1)
    return max(1, min(4, cores - 1))


def _start_worker(rank_pid: int) -> None:
    import signal

    import torch

    from vlm_bridge.parallel import die_with

    # The rank decides what Ctrl-C does (it closes the pool); SIGTERM ends a worker quietly, as
    # does the rank's death.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with(rank_pid)
    torch.set_num_threads(1)  # one core each: the workers together are the parallelism


def _encode(index: int) -> tuple[Any, dict[str, int], dict[str, str]]:
    before = dict(_ENCODER.stats)
    encoded = _PREPARE(_ENCODER.encode(_SAMPLES[index], where=f"training sample {index}"))
    added = {k: v - before.get(k, 0) for k, v in _ENCODER.stats.items() if v != before.get(k, 0)}
    return encoded, added, getattr(_ENCODER, "skip_examples", {})


class EncodeAhead:
    """A pool of ``workers`` processes encoding ``samples[index]`` for positions ``key`` (any
    ordered value; the stream uses (epoch, index in the epoch's order)); ``prepare`` finishes each
    encoded sample there (the stream works out its positions)."""

    def __init__(self, encoder, samples, workers: int, prepare: Callable[[Any], Any] = lambda s: s) -> None:
        global _ENCODER, _SAMPLES, _PREPARE
        # The workers' tokenizers run one thread each (and say nothing of the fork).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _ENCODER, _SAMPLES, _PREPARE = encoder, samples, prepare
        self.encoder = encoder
        self._pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                                            initializer=_start_worker, initargs=(os.getpid(),))
        self._pending: dict[Any, cf.Future] = {}

    def _submit(self, index: int) -> cf.Future:
        with warnings.catch_warnings():
            # Python 3.12 warns on any fork of a process with threads; the workers only encode (no
            # lock of the trainer's threads is taken), as DataLoader's forked workers do.
            warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks",
                                    category=DeprecationWarning)
            return self._pool.submit(_encode, index)

    def ahead(self, positions: Iterable[tuple[Any, int]]) -> None:
        """Start encoding these (key, sample index) positions, unless already started."""
        for key, index in positions:
            if key not in self._pending:
                self._pending[key] = self._submit(index)

    def take(self, key, index: int):
        """The encoded sample at ``key`` (None when skipped); its counts join the encoder's."""
        future = self._pending.pop(key, None) or self._submit(index)
        for passed in [k for k in self._pending if k < key]:  # positions the stream moved past
            self._pending.pop(passed).cancel()
        try:
            encoded, added, examples = future.result()
        except cf.BrokenExecutor:  # not a bug here: the machine ended it (an OSError: one error line)
            raise ChildProcessError(f"an encoding worker process died (killed, or out of memory?) while "
                                    f"the samples from training sample {index} on were encoded; "
                                    "data.workers=0 encodes in the rank itself") from None
        for name, count in added.items():
            self.encoder.stats[name] = self.encoder.stats.get(name, 0) + count
        if hasattr(self.encoder, "skip_examples"):
            for reason, example in examples.items():
                self.encoder.skip_examples.setdefault(reason, example)
        return encoded

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
