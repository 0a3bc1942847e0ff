"""A deterministic, resumable stream of micro-batches for one training step at a time.

Raw samples are visited in a seeded permutation per epoch and encoded lazily. A step consumes a
contiguous run of that order; its start is the data position saved in checkpoints, so a resumed
run rebuilds exactly the batches the uninterrupted run would have seen. Every rank builds the
same global batch; data-parallel rank r trains on micro-batches r, r + dp, ...

``prepare_next`` builds the next step in a thread while the current one trains (packing and
collating, and encoding what the workers have not), so a GPU does not wait for the host between
steps; the batches, positions and counts are those of building it when asked.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from vlm_bridge.train.batching import (
    BestFitRows,
    MicroBatch,
    collate_packed,
    collate_padded,
    group_rows,
    media_kind,
    row_length,
    sample_positions,
)

# Encoded samples held ahead of the stream at most (each holds its pixels: a few MB an image).
MAX_LOOKAHEAD = 256


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # next position in this epoch's permutation


@dataclass
class _PreparedStep:
    """A step built ahead: ``start`` and ``counts`` are the stream's position and encoder counts
    before it, what a checkpoint or a report takes while it is not handed out."""

    num_microbatches: int
    start: DataPosition
    counts: dict
    thread: threading.Thread | None = None
    batches: list | None = None
    error: BaseException | None = None


class _Cancelled(Exception):
    """The stream closed while a step was being built ahead."""


class MicroBatchStream:
    def __init__(self, samples, encoder, family, settings, *, seq_len: int, pack: bool,
                 micro_batch_size: int, pad_id: int, seed: int, shuffle: bool, pad_to_seq_len: bool,
                 row_multiple: int = 256):
        self.samples, self.encoder = samples, encoder
        self.family, self.settings = family, settings
        self.seq_len, self.pack, self.mbs = seq_len, pack, micro_batch_size
        self.pad_id, self.seed, self.shuffle = pad_id, seed, shuffle
        # Rows keep seq_len tokens when pipeline stages exchange messages of one fixed shape.
        self.pad_to_seq_len, self.row_multiple = pad_to_seq_len, row_multiple
        self.position = DataPosition()
        self._cache: tuple[tuple[int, int], object] | None = None  # the pending sample of a full row
        self._orders: dict[int, list[int]] = {}  # this epoch's order and, when looking ahead, the next
        self.ahead = None  # an EncodeAhead: the next samples are encoded by worker processes
        self._workers = self._lookahead = 0
        self._ahead_until = 0  # positions before this ordinal (epoch * samples + index) were asked ahead
        self._taken = 0  # samples the stream moved past (the last step's count sets the lookahead)
        self._prepared: _PreparedStep | None = None
        self._closing = False
        if len(samples) == 0:
            raise ValueError("the training data source is empty")
        if row_multiple < 0:
            raise ValueError(f"data.row_multiple must be >= 0, got {row_multiple}")

    def encode_ahead(self, workers: int) -> None:
        """Encode the samples the stream will ask for next in ``workers`` processes (0: here),
        started at the first sample asked for and stopped by ``close``."""
        self._workers = workers
        self._lookahead = 2 * workers

    def close(self) -> None:
        if self._prepared is not None and self._prepared.thread is not None:
            self._closing = True  # the step being built stops at its next sample
            self._prepared.thread.join()
        self._prepared, self._closing = None, False
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None
        self._workers = 0

    def _order_of(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            n = len(self.samples)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def _permutation(self) -> list[int]:
        return self._order_of(self.position.epoch)

    def _encode(self, key: tuple[int, int], index: int):
        if self.ahead is None and self._workers > 0:
            from vlm_bridge.train.encode_ahead import EncodeAhead

            self.ahead = EncodeAhead(self.encoder, self.samples, self._workers, self._with_positions)
        if self.ahead is None:
            encoded = self.encoder.encode(self.samples[index], where=f"training sample {index}")
            return self._with_positions(encoded)
        self.ahead.ahead(self._positions_after(key, self._lookahead))
        return self.ahead.take(key, index)

    def _with_positions(self, sample):
        """The sample with its positions worked out (packing places them; see collate_packed)."""
        if sample is not None and self.pack:
            sample.positions = sample_positions(self.family, self.settings, sample)
        return sample

    def _positions_after(self, key: tuple[int, int], count: int) -> list[tuple[tuple[int, int], int]]:
        """The (position, sample index) pairs of the ``count`` positions from ``key`` on, into later
        epochs, that no earlier call returned (positions only move forward within a run)."""
        n = len(self.samples)
        first, end = key[0] * n + key[1], key[0] * n + key[1] + count  # positions as one ordinal
        out = []
        for ordinal in range(max(first, self._ahead_until), end):
            epoch, i = divmod(ordinal, n)
            out.append(((epoch, i), self._order_of(epoch)[i]))
        self._ahead_until = max(self._ahead_until, end)
        return out

    def _peek_encoded(self):
        """Encoded sample at the current position (skipped samples advance the position)."""
        for _ in range(2 * len(self.samples) + 1):
            if self._closing:
                raise _Cancelled
            order = self._permutation()
            if self.position.index >= len(order):
                self.position = DataPosition(self.position.epoch + 1, 0)
                continue
            key = (self.position.epoch, self.position.index)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            index = order[self.position.index]
            encoded = self._encode(key, index)
            self._cache = (key, encoded)
            if encoded is not None:
                return encoded
            self.position.index += 1
        counts = {k: v for k, v in self.encoder.stats.items() if v and k not in ("encoded", "truncated")}
        example = next(iter(getattr(self.encoder, "skip_examples", {}).values()), None)
        raise ValueError(f"no sample of the data source survives encoding (skipped: {counts}"
                         + (f"; first: {example})" if example else ")"))

    def _advance(self) -> None:
        self.position.index += 1
        self._taken += 1

    def _next_sample(self):
        """The next sample, consumed (an unpacked row holds it alone)."""
        sample = self._peek_encoded()
        self._advance()
        return sample

    def _packed_rows(self, num_rows: int) -> list[list]:
        """The next samples, best-fit into ``num_rows`` rows, up to the first that none holds.

        A step still consumes a contiguous run of the order (the resume position stays one
        index); inside the step a sample goes into the fullest row that holds it rather than
        closing each row at the first sample that overflows it.
        """
        packer = BestFitRows(self.seq_len, num_rows)
        taken: list = []
        video_alone = getattr(self.family, "video_batch_alone", False)
        while True:
            sample = self._peek_encoded()
            # the first always fits: a fresh row; images and videos in separate rows where needed
            if not packer.add(sample.input_ids.numel(), media_kind(sample) if video_alone else None):
                break
            taken.append(sample)
            self._advance()
        # The loop stops only once all num_rows rows exist and none holds the next sample.
        return [[taken[i] for i in row] for row in packer.ordered()]

    @property
    def resume_position(self) -> DataPosition:
        """Where a run resumed from here starts: after the last step handed out."""
        return self._prepared.start if self._prepared is not None else self.position

    def counts(self) -> dict:
        """The encoder's counts over the steps handed out."""
        return dict(self._prepared.counts if self._prepared is not None else self.encoder.stats)

    def prepare_next(self, num_microbatches: int) -> None:
        """Start building the next step in a thread (``VLM_BRIDGE_PREPARE_AHEAD=0``: build it
        now); ``next_step`` hands it out, and raises what building it raised."""
        if self._prepared is not None:
            return
        prepared = _PreparedStep(num_microbatches, DataPosition(self.position.epoch, self.position.index),
                                 dict(self.encoder.stats))
        self._prepared = prepared

        def build() -> None:
            try:
                prepared.batches = self._build_step(num_microbatches)
            except BaseException as err:  # raised where the step is asked for
                prepared.error = err

        if os.environ.get("VLM_BRIDGE_PREPARE_AHEAD", "1") == "0":
            build()
            return
        prepared.thread = threading.Thread(target=build, name="vlm-bridge-next-step", daemon=True)
        prepared.thread.start()

    def next_step(self, num_microbatches: int) -> list[MicroBatch]:
        """The micro-batches of one global step (all data-parallel ranks' worth)."""
        prepared = self._prepared
        if prepared is None:
            return self._build_step(num_microbatches)
        if prepared.thread is not None:
            prepared.thread.join()
        self._prepared = None  # (after the wait: a stop signal during it leaves close() to join)
        if prepared.num_microbatches != num_microbatches:
            raise RuntimeError(f"a step of {prepared.num_microbatches} micro-batches was prepared, "
                               f"{num_microbatches} were asked for")
        if prepared.error is not None:
            raise prepared.error
        return prepared.batches

    def _build_step(self, num_microbatches: int) -> list[MicroBatch]:
        if self.ahead is not None and self._taken:
            # Look as far ahead as the last step took, so that the next step's samples are all
            # encoded while this one trains; at most MAX_LOOKAHEAD samples are held encoded ahead.
            wanted = max(self._lookahead, self._taken + 1)
            self._lookahead = min(wanted, max(MAX_LOOKAHEAD, 2 * self._workers))
        self._taken = 0
        if not self.pack:
            length = self.seq_len if self.pad_to_seq_len else None
            return [collate_padded([self._next_sample() for _ in range(self.mbs)], self.family,
                                   self.settings, self.pad_id, length)
                    for _ in range(num_microbatches)]
        rows = self._packed_rows(num_microbatches * self.mbs)
        out = []
        for group in group_rows(rows, self.mbs, getattr(self.family, "video_batch_alone", False),
                                fixed=self.pad_to_seq_len):
            length = row_length(group, self.seq_len, None if self.pad_to_seq_len else self.row_multiple)
            out.append(collate_packed(group, self.family, self.settings, length, self.pad_id))
        return out
