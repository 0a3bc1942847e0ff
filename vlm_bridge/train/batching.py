"""Encoded samples -> model micro-batches: padding-free packing or padded batches.

Packing concatenates whole samples into rows of ``seq_len`` tokens. Each sample keeps its own
segment id, so attention never crosses sample boundaries, and its own positions (computed per
sample by the family, 1-D or 3-D, so they restart at 0). Labels are shifted inside each sample
only; the token-mean loss over all loss tokens is then identical to the unpacked batch. Which
processor outputs travel with the tokens is the family's declaration: ``media_keys`` are
concatenated over the samples, ``token_keys`` are packed along the sequence like ``input_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_bridge.attention.core import AttentionMask
from vlm_bridge.runtime import on_device

IGNORE = -100


@dataclass
class MicroBatch:
    """Model forward kwargs plus shifted targets; ``loss_mask`` marks tokens that count."""

    inputs: dict
    labels: torch.Tensor  # [b, s] next-token targets (0 where masked)
    loss_mask: torch.Tensor  # [b, s] float
    num_tokens: int  # real (non-padding) tokens, for throughput

    def to(self, device) -> MicroBatch:
        return MicroBatch(on_device(self.inputs, device), self.labels.to(device),
                          self.loss_mask.to(device), self.num_tokens)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position i predicts token i+1 of the same sample."""
    out = torch.full_like(labels, IGNORE)
    out[:-1] = labels[1:]
    return out


def pack_greedy(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Group sample indices, in order, into rows of at most ``seq_len`` tokens."""
    rows: list[list[int]] = []
    used = seq_len + 1
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"sample of {n} tokens does not fit seq_len {seq_len}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _media_of(samples, keys) -> dict:
    """The samples' media tensors, concatenated per key in sample order (as a processor batches);
    items whose sizes differ beyond the first dimension (videos of different frame sizes) stay a
    list in sample order, for the family's tower to take one by one."""
    out = {}
    for key in keys:
        parts = [s.media[key] for s in samples if key in s.media]
        if parts:
            same = len({tuple(p.shape[1:]) for p in parts}) == 1
            out[key] = torch.cat(parts) if same else parts
    return out


def _sample_positions(family, settings, sample) -> torch.Tensor:
    """The family's positions of one sample alone: ``[..., 1, n]``."""
    batch = {"input_ids": sample.input_ids[None], **sample.media,
             **{k: v[None] for k, v in sample.tokens.items()}}
    return family.position_ids(settings, batch)


def collate_packed(rows: list[list], family, settings, seq_len: int, pad_id: int) -> MicroBatch:
    """One micro-batch of packed rows, each padded to ``seq_len``."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    seg = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    tokens = {key: torch.zeros(len(rows), seq_len, dtype=torch.long) for key in family.token_keys}
    pos = None
    for r, row in enumerate(rows):
        start = 0
        for j, sample in enumerate(row):
            n = sample.input_ids.numel()
            ids[r, start:start + n] = sample.input_ids
            seg[r, start:start + n] = j
            sample_pos = _sample_positions(family, settings, sample)
            if pos is None:  # [len(rows), seq_len] after the family's leading axes (3 for MRoPE)
                pos = torch.zeros(*sample_pos.shape[:-2], len(rows), seq_len, dtype=torch.long)
            pos[..., r, start:start + n] = sample_pos[..., 0, :]
            labels[r, start:start + n] = shift_labels(sample.labels)
            for key, packed in tokens.items():
                if key in sample.tokens:
                    packed[r, start:start + n] = sample.tokens[key]
            start += n
    flat = [s for row in rows for s in row]
    present = {k: v for k, v in tokens.items() if any(k in s.tokens for s in flat)}
    inputs = {"input_ids": ids, "position_ids": pos,
              "attention_mask": AttentionMask(segment_ids=seg, causal=True),
              **_media_of(flat, family.media_keys), **present}
    return _finish(inputs, labels, int((seg >= 0).sum()))


def collate_padded(samples: list, family, settings, pad_id: int, length: int | None = None) -> MicroBatch:
    """A right-padded micro-batch (one sample per row)."""
    n = length or max(s.input_ids.numel() for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), n, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
    tokens = {key: torch.zeros(len(samples), n, dtype=torch.long) for key in family.token_keys
              if any(key in s.tokens for s in samples)}
    for r, s in enumerate(samples):
        k = s.input_ids.numel()
        ids[r, :k], mask[r, :k], labels[r, :k] = s.input_ids, 1, shift_labels(s.labels)
        for key, padded in tokens.items():
            if key in s.tokens:
                padded[r, :k] = s.tokens[key]
    # Every media key the processor gave (positions may need more than the model consumes).
    media_keys = sorted({key for s in samples for key in s.media})
    batch = {"input_ids": ids, "attention_mask": mask, **tokens, **_media_of(samples, media_keys)}
    inputs = family.model_inputs(settings, batch)
    # Always a segment mask (even without padding) so the shape matches packed rows.
    inputs["attention_mask"] = AttentionMask(segment_ids=torch.where(mask.bool(), 0, -1), causal=True)
    return _finish(inputs, labels, int(mask.sum()))


def _finish(inputs: dict, labels: torch.Tensor, num_tokens: int) -> MicroBatch:
    loss_mask = (labels != IGNORE).float()
    return MicroBatch(inputs, labels.clamp(min=0), loss_mask, num_tokens)
