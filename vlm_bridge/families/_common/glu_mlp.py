"""Megatron's gated MLP with the GELU-tanh gate as one fused function.

Megatron fuses only erf-GELU and SiLU gates; for GELU-tanh (GeGLU) its unfused path chunks,
activates and multiplies in separate kernels. :func:`gelu_tanh_mlp` runs an ``MLP`` module's own
``linear_fc1`` / ``linear_fc2`` (adapters included) around :func:`.fused.gelu_tanh_glu`, so the
module keeps every parameter, name and sharding of Megatron's ``MLP``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP

from vlm_bridge.families._common.fused import gelu_tanh_glu


def gelu_tanh_activation(intermediate: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` of ``fc1``'s output ``[gate | up]`` (plus its bias)."""
    if bias is not None:
        intermediate = intermediate + bias
    return gelu_tanh_glu(intermediate)


def gelu_tanh_mlp(mlp: MLP, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fc2(gelu_tanh(gate) * up)`` with ``[gate | up] = fc1(x)``, as ``MLP.forward`` returns it
    (output, bias); needs ``gated_linear_unit``. A layer that calls it sets
    ``mlp.rebuild_activation = gelu_tanh_activation``, so that training can rebuild the activation
    output in the backward instead of keeping it."""
    return mlp.linear_fc2(gelu_tanh_activation(*mlp.linear_fc1(hidden_states)))
