"""Megatron's MLP with the gated GELU-tanh activation as one fused function.

Megatron fuses only erf-GELU and SiLU gates; for GELU-tanh (GeGLU) its unfused path chunks,
activates and multiplies in separate kernels. This subclass runs the same arithmetic through
:func:`.fused.gelu_tanh_glu` and keeps every parameter, name and sharding of ``MLP``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP

from vlm_bridge.families._common.fused import gelu_tanh_glu


class GeluTanhGatedMLP(MLP):
    """``fc2(gelu_tanh(gate) * up)`` with ``[gate | up] = fc1(x)``; needs ``gated_linear_unit``."""

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if per_token_scale is not None:  # expert weighting: Megatron's own path handles it
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(gelu_tanh_glu(intermediate))
