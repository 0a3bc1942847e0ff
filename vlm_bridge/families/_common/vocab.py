"""Vocabulary padding shared by every family.

Megatron shards the embedding and output layer by rows across TP ranks, so the row count must be
divisible by TP. We pad to a multiple of 128 independent of TP, so that one distributed checkpoint
has the same padded shape whatever layout later loads it; padded rows are zero and are dropped again
on export and from logits.
"""

from __future__ import annotations

import torch

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    padded = -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if padded % tp:
        raise ValueError(f"--tp {tp} does not divide the padded vocabulary size ({padded})")
    return padded


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, inplace: bool = False) -> torch.Tensor:
    """Set the logits of padded vocabulary rows to -inf on this TP rank's vocabulary shard
    (``inplace`` on a tensor nothing else needs, e.g. the loss's own fp32 copy: at a 262k
    vocabulary every full-size copy of the logits is gigabytes).

    Padded rows are zero, so their logits are 0, not -inf: left in, they would add
    ``exp(0)`` terms to every softmax and the training loss would differ from HF's.
    """
    from megatron.core import parallel_state

    local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    if start + local <= vocab_size:
        return logits
    cols = torch.arange(start, start + local, device=logits.device) >= vocab_size
    return logits.masked_fill_(cols, float("-inf")) if inplace else logits.masked_fill(cols, float("-inf"))
