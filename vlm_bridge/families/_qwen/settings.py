"""Settings both Qwen-VL families need beyond their TransformerConfigs, and their layout checks."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.megatron_config import padded_vision_ffn, require_divisible
from vlm_bridge.families._common.vocab import padded_vocab_size


@dataclass
class QwenVLSettings:
    """Fields both Qwen VLM families need beyond their TransformerConfigs."""

    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    mrope_section: list[int]
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    vision_rope_theta: float
    out_hidden_size: int
    vision_ffn_size: int  # as on disk; Megatron's is zero-padded (padded_vision_ffn)


def qwen_vl_settings(hf_config, language: TransformerConfig, tp: int, default_rope_theta: float) -> dict:
    """Keyword arguments for the :class:`QwenVLSettings` fields, read from the HF config."""
    text, vision = hf_config.text_config, hf_config.vision_config
    rope = dict(text.rope_parameters or {})
    return dict(
        vocab_size=text.vocab_size,
        padded_vocab_size=padded_vocab_size(text.vocab_size, tp),
        max_position_embeddings=text.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", default_rope_theta)),
        mrope_section=list(language.mrope_section),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        in_channels=vision.in_channels,
        spatial_merge_size=vision.spatial_merge_size,
        vision_rope_theta=float((vision.rope_parameters or {}).get("rope_theta", 10000.0)),
        out_hidden_size=vision.out_hidden_size,
        vision_ffn_size=vision.intermediate_size,
    )


def check_divisibility(hf_config, tp: int, pp: int) -> None:
    """One-line errors for layouts a Qwen-style VLM cannot be split into (before Megatron asserts)."""
    text, vision = hf_config.text_config, hf_config.vision_config
    checks = [
        ("language attention heads", text.num_attention_heads, tp, "--tp"),
        ("language key/value heads", text.num_key_value_heads, tp, "--tp"),
        # MoE layers use the expert FFN width, never the dense ``intermediate_size``.
        ("language FFN size", text.moe_intermediate_size if getattr(text, "num_experts", None)
         else text.intermediate_size, tp, "--tp"),
        ("vision attention heads", vision.num_heads, tp, "--tp"),
        ("vision FFN size (zero-padded to a multiple of 8)", padded_vision_ffn(vision.intermediate_size),
         tp, "--tp"),
        ("merger width", vision.hidden_size * vision.spatial_merge_size**2, tp, "--tp"),
        ("language layers", text.num_hidden_layers, pp, "--pp"),
    ]
    require_divisible(checks)
