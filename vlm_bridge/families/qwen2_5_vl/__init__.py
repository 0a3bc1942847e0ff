"""Qwen2.5-VL (3B/7B/32B/72B) on Megatron-Core."""

from __future__ import annotations

import torch

from vlm_bridge.families._qwen.mrope import mrope_position_ids
from vlm_bridge.families.base import Family
from vlm_bridge.families.qwen2_5_vl.config import Qwen25VLSettings, build_configs
from vlm_bridge.families.qwen2_5_vl.mapping import LAYOUTS, weight_table
from vlm_bridge.families.qwen2_5_vl.model import Qwen25VLModel
from vlm_bridge.families.qwen2_5_vl.recipes import RECIPES


def position_ids(s: Qwen25VLSettings, batch: dict) -> torch.Tensor:
    """3-D MRoPE positions; video time steps scale with ``second_per_grid_ts``."""
    return mrope_position_ids(
        batch["input_ids"], batch.get("attention_mask"), batch.get("image_grid_thw"),
        batch.get("video_grid_thw"), image_token_id=s.image_token_id, video_token_id=s.video_token_id,
        spatial_merge_size=s.spatial_merge_size, tokens_per_second=s.tokens_per_second,
        second_per_grid_ts=batch.get("second_per_grid_ts"),
    )


FAMILY = Family(
    name="qwen2_5_vl",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    model_types=("qwen2_5_vl",),
    build_configs=build_configs,
    build_model=Qwen25VLModel,
    weight_table=weight_table,
    layouts=LAYOUTS,
    components={
        "vision": ("vision.patch_embed.", "vision.layers."),
        "projector": ("vision.merger.",),
        "language_model": ("language_model.",),
    },
    # hub names (model.layers.*, visual.*) -> transformers 5 module paths
    hf_module_prefixes={"model.": "model.language_model.", "visual.": "model.visual.", "lm_head": "lm_head"},
    media_keys=("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"),
    position_ids=position_ids,
    hf_vision_module="model.visual",
    tiny_builder="vlm_bridge.testing.tiny_qwen2_5_vl:build_tiny_qwen2_5_vl",
    tiny_variants={"default": {}, "tied": {"tie_word_embeddings": True}},
    recipes=RECIPES,
)

FAMILIES = [FAMILY]
