"""Megatron-Core layer specs built from local (non-TE) modules and our torch-native attention."""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from vlm_bridge.attention.core import TorchCoreAttention
from vlm_bridge.compat.no_te import patch_megatron_without_te
from vlm_bridge.families._common.experts import experts_module
from vlm_bridge.families._common.linears import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear


def transformer_layer_spec(
    *, qk_norm: bool = False, attn_mask_type: AttnMaskType = AttnMaskType.causal,
    num_experts: int | None = None,
) -> ModuleSpec:
    """A pre-norm transformer layer: norm -> attention -> add, norm -> (gated) MLP or MoE -> add.

    The norm class follows ``config.normalization`` (LayerNorm or RMSNorm), so one spec serves the
    vision towers and the language models of every family. With ``num_experts`` the MLP is
    Megatron's MoE layer (router + local experts run as grouped GEMMs, expert-parallel).
    """
    qk = WrappedTorchNorm if qk_norm else IdentityOp
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=FusedBiasColumnParallelLinear,
                                 linear_fc2=FusedBiasRowParallelLinear),
    )
    if num_experts:
        patch_megatron_without_te()
        mlp = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts)
        mlp.submodules.experts.module = experts_module()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=FusedBiasColumnParallelLinear,
                    core_attention=TorchCoreAttention,
                    linear_proj=FusedBiasRowParallelLinear,
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )
