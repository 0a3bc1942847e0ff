"""The TF32 matmul switch, read and written through whichever torch API is already in use.

torch has two APIs for it (``torch.backends.cuda.matmul.allow_tf32`` and ``.fp32_precision``) and
raises when the old one is read after the new one was set, so a user's script that set the new
one would make any later ``allow_tf32`` read fail. Everything here probes which API is in use and
sticks to it, so it never introduces the mix itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_MATMUL = torch.backends.cuda.matmul


def _legacy_value() -> bool | None:
    """``allow_tf32``, or None where the new API was used (reading the old one is then refused)."""
    try:
        return bool(_MATMUL.allow_tf32)
    except RuntimeError:
        return None


def matmul_tf32_enabled() -> bool:
    """Whether fp32 CUDA matmuls may use TF32."""
    legacy = _legacy_value()
    return _MATMUL.fp32_precision == "tf32" if legacy is None else legacy


@contextlib.contextmanager
def matmul_tf32(enabled: bool | None) -> Iterator[None]:
    """Set the switch (``None``: leave it) inside the block and put the previous value back."""
    legacy = _legacy_value()
    saved = _MATMUL.fp32_precision if legacy is None else legacy
    try:
        if enabled is not None:
            set_matmul_tf32(enabled)
        yield
    finally:
        if legacy is None:
            _MATMUL.fp32_precision = saved
        else:
            _MATMUL.allow_tf32 = saved


def set_matmul_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for fp32 CUDA matmuls, through the API in use."""
    if _legacy_value() is None:
        _MATMUL.fp32_precision = "tf32" if enabled else "ieee"
    else:
        _MATMUL.allow_tf32 = enabled
