"""An RMSNorm that normalises and scales in fp32 whatever the activation dtype (Megatron norm
signature), with a weight applied as ``w`` or as ``1 + w`` (a subclass sets ``offset``); Megatron's
torch norm scales in the activation dtype instead."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.offset + self.weight.float()) * out).to(x.dtype)
