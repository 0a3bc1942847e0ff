"""Checks shared by the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_bridge.convert.hf_io import SafetensorsReader


def checkpoint_mismatches(a: str | Path, b: str | Path) -> list[str]:
    """Tensor names that differ between two HF folders: missing on one side, other dtype, or
    not bit-identical. Empty means a bit-exact match. Reads one tensor at a time."""
    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        if ra.keys() != rb.keys():
            return sorted(set(ra.keys()) ^ set(rb.keys()))
        return [
            k for k in ra.keys() if ra.dtype(k) != rb.dtype(k) or not torch.equal(ra.get(k), rb.get(k))
        ]
