"""An RMSNorm that normalises and scales in fp32 whatever the activation dtype (Megatron norm
signature), with a weight applied as ``w`` or as ``1 + w`` (a subclass sets ``offset``); Megatron's
torch norm scales in the activation dtype instead. On the GPU it is one fused kernel
(:mod:`.fused`), optionally with the residual add that follows a post-norm."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.fused import fp32_rms_norm


class Fp32RMSNorm(torch.nn.Module):
    """``(offset + w.float()) * norm(x.float())`` cast back to x's dtype; the weight starts at the
    identity (``1 - offset``)."""

    offset = 0.0

    def __init__(self, config: TransformerConfig | None = None, hidden_size: int = 0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        dtype = config.params_dtype if config is not None else torch.float32
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - self.offset, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The normed ``x``, plus ``residual`` when given."""
        return fp32_rms_norm(x, self.weight, self.offset, self.eps, residual)
