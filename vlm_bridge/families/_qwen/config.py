"""TransformerConfigs of the Qwen-VL language models and vision towers, from their HF configs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.megatron_config import common_kwargs, vision_tower_config


def qwen_language_config(
    text_config, dtype: torch.dtype, tp: int, pp: int, *, family: str,
    default_mrope_section: list[int], **family_fields,
) -> TransformerConfig:
    """The TransformerConfig of a Qwen-VL language model (RMSNorm, SwiGLU, GQA, MRoPE, no linear
    biases) from its HF ``text_config``; ``family_fields`` add to or override these fields."""
    rope = dict(text_config.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ValueError(f"{family} rope_type {rope.get('rope_type')!r} is not supported")
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads)
    fields = dict(
        num_layers=text_config.num_hidden_layers,
        hidden_size=text_config.hidden_size,
        ffn_hidden_size=text_config.intermediate_size,
        num_attention_heads=text_config.num_attention_heads,
        num_query_groups=text_config.num_key_value_heads,
        kv_channels=head_dim,
        layernorm_epsilon=text_config.rms_norm_eps,
        add_bias_linear=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        mrope_section=list(rope.get("mrope_section", default_mrope_section)),
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        **common_kwargs(dtype),
    )
    return TransformerConfig(**{**fields, **family_fields})


def qwen_vision_config(vision_config, dtype: torch.dtype, tp: int, norm_eps: float,
                       **family_fields) -> TransformerConfig:
    """The TransformerConfig of a Qwen-VL vision tower from its HF ``vision_config``."""
    return vision_tower_config(
        layers=vision_config.depth, hidden=vision_config.hidden_size,
        ffn=vision_config.intermediate_size, heads=vision_config.num_heads, norm_eps=norm_eps,
        dtype=dtype, tp=tp, **family_fields,
    )
