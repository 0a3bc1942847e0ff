"""Small non-weight tensors that a checkpoint carries and a round trip must give back as they were.

Some HF folders hold constants next to the weights: index buffers (RADIO's ``summary_idxs``),
identity LayerScales, preprocessing statistics. They are not Megatron parameters, so a family names
them by pattern; import checks them (the family may refuse values it cannot run) and keeps them in
the checkpoint metadata as JSON, and export writes them back under their original names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

# Metadata is JSON: anything bigger than this is a weight, not a constant.
MAX_ELEMENTS = 1 << 20


def split_keys(keys: Iterable[str], patterns: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(weight keys, passthrough keys)``: keys matching any regex in ``patterns`` pass through."""
    compiled = [re.compile(p) for p in patterns]
    weights, passed = [], []
    for key in keys:
        (passed if any(p.search(key) for p in compiled) else weights).append(key)
    return weights, passed


def to_json(tensors: dict[str, torch.Tensor]) -> dict:
    out = {}
    for name, t in sorted(tensors.items()):
        if t.numel() > MAX_ELEMENTS:
            raise ValueError(f"{name}: {t.numel()} elements is too large for a passthrough constant")
        out[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                     "data": t.flatten().tolist()}
    return out


def from_json(data: dict) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
        for name, v in data.items()
    }
