"""Vocabulary padding shared by every family.

Megatron shards the embedding and output layer by rows across TP ranks, so the row count must be
divisible by TP. We pad to a multiple of 128 independent of TP, so that one distributed checkpoint
has the same padded shape whatever layout later loads it; padded rows are zero and are dropped again
on export and from logits.
"""

from __future__ import annotations

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    padded = -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if padded % tp:
        raise ValueError(f"--tp {tp} does not divide the padded vocabulary size ({padded})")
    return padded
