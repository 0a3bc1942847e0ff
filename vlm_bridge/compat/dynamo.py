"""How many variants torch.compile keeps per compiled function.

Dynamo compiles a function once per distinct set of guards (tensor rank, sizes where shapes are
static, dims of size one, view bases, dtypes, which inputs need gradients) and, past its default
limit of 8, stops compiling it: with ``fullgraph=True`` that is an error, otherwise the function
silently runs eagerly, which for FlexAttention means materialising every score. Packed rows of a
few lengths and micro-batches of one or several rows make more variants than that.
"""

from __future__ import annotations

import torch

RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    """Raise dynamo's per-function variant limit to at least ``RECOMPILE_LIMIT``; it has no per-function
    setting and reads the global one at every cache miss, so raising it once costs nothing per
    call (a patch around each call cost 26 us of host time)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
