"""A deterministic, resumable stream of micro-batches for one training step at a time.

Raw samples are visited in a seeded permutation per epoch and encoded lazily. A step consumes a
contiguous run of that order; its start is the data position saved in checkpoints, so a resumed
run rebuilds exactly the batches the uninterrupted run would have seen. Every rank builds the
same global batch; data-parallel rank r trains on micro-batches r, r + dp, ...
"""

from __future__ import annotations

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
)


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # next position in this epoch's permutation


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
        self._order: list[int] | None = None
        self._order_epoch = -1
        self._cache: tuple[tuple[int, int], object] | None = None  # the pending sample of a full row
        if len(samples) == 0:
            raise ValueError("the training data source is empty")
        if row_multiple < 0:
            raise ValueError(f"data.row_multiple must be >= 0, got {row_multiple}")

    def _permutation(self) -> list[int]:
        if self._order_epoch != self.position.epoch:
            n = len(self.samples)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.position.epoch)
                self._order = torch.randperm(n, generator=g).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = self.position.epoch
        return self._order

    def _peek_encoded(self):
        """Encoded sample at the current position (skipped samples advance the position)."""
        for _ in range(2 * len(self.samples) + 1):
            order = self._permutation()
            if self.position.index >= len(order):
                self.position = DataPosition(self.position.epoch + 1, 0)
                continue
            key = (self.position.epoch, self.position.index)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            index = order[self.position.index]
            encoded = self.encoder.encode(self.samples[index], where=f"training sample {index}")
            self._cache = (key, encoded)
            if encoded is not None:
                return encoded
            self.position.index += 1
        raise ValueError("no sample of the data source survives encoding (see the skip counts)")

    def _advance(self) -> None:
        self.position.index += 1

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

    def next_step(self, num_microbatches: int) -> list[MicroBatch]:
        """The micro-batches of one global step (all data-parallel ranks' worth)."""
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
