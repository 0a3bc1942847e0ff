"""TransformerConfigs of the Qwen-VL language models and vision towers, from their HF configs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.megatron_config import (
    decoder_config,
    padded_vision_ffn,
    vision_tower_config,
)


def qwen_language_config(
    text_config, dtype: torch.dtype, tp: int, pp: int, *, family: str,
    default_mrope_section: list[int], **family_fields,
) -> TransformerConfig:
    """The TransformerConfig of a Qwen-VL language model (RMSNorm, SwiGLU, GQA, MRoPE, no linear
    biases) from its HF ``text_config``; ``family_fields`` add to or override these fields."""
    rope = dict(text_config.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ValueError(f"{family} rope_type {rope.get('rope_type')!r} is not supported")
    section = list(rope.get("mrope_section", default_mrope_section))
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    if sum(section) * 2 != head_dim:  # each axis takes its share of the head's rotary half
        raise ValueError(f"config.json: {family} mrope_section {section} covers {2 * sum(section)} "
                         f"rotary channels, but a head has {head_dim}")
    # Qwen-VL language models have no linear biases (Qwen2.5's qkv bias comes as a family field).
    return decoder_config(
        text_config, dtype, tp, pp, add_bias_linear=False, mrope_section=section, activation_func=F.silu,
        **family_fields,
    )


def qwen_vision_config(vision_config, dtype: torch.dtype, tp: int, norm_eps: float,
                       **family_fields) -> TransformerConfig:
    """The TransformerConfig of a Qwen-VL vision tower from its HF ``vision_config``."""
    return vision_tower_config(
        layers=vision_config.depth, hidden=vision_config.hidden_size,
        ffn=padded_vision_ffn(vision_config.intermediate_size), heads=vision_config.num_heads,
        norm_eps=norm_eps,
        dtype=dtype, tp=tp, **family_fields,
    )
