"""Megatron-Core 0.16.1 without Transformer Engine: gaps in optional-import fallbacks.

``moe_utils.RouterGatingLinearFunction`` tests ``te_general_gemm is not None`` but the name is only
defined when Transformer Engine imports, so every MoE router raises ``NameError`` without TE. Define
it as None (the function then uses its torch.mm path). Applied on CPU and GPU alike.
"""

from __future__ import annotations


def patch_megatron_without_te() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
