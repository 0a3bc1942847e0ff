"""Qwen3-VL (dense 2B-32B, MoE 30B-A3B / 235B-A22B) on Megatron-Core."""

from __future__ import annotations

import dataclasses

import torch

from vlm_bridge.families._qwen.mrope import mrope_position_ids
from vlm_bridge.families.base import Family
from vlm_bridge.families.qwen3_vl.config import Qwen3VLSettings, build_configs
from vlm_bridge.families.qwen3_vl.mapping import LAYOUTS, weight_table
from vlm_bridge.families.qwen3_vl.model import Qwen3VLModel
from vlm_bridge.families.qwen3_vl.recipes import RECIPES


def position_ids(s: Qwen3VLSettings, batch: dict) -> torch.Tensor:
    """Each video frame is its own vision span (timestamps between frames), so positions use
    the video grid split per frame, advancing like images."""
    videos = batch.get("video_grid_thw")
    frames = None
    if videos is not None:
        frames = torch.repeat_interleave(videos, videos[:, 0], dim=0)
        frames[:, 0] = 1
    return mrope_position_ids(
        batch["input_ids"], batch.get("attention_mask"), batch.get("image_grid_thw"), frames,
        image_token_id=s.image_token_id, video_token_id=s.video_token_id,
        spatial_merge_size=s.spatial_merge_size, tokens_per_second=s.tokens_per_second,
    )


FAMILY = Family(
    name="qwen3_vl",
    architectures=("Qwen3VLForConditionalGeneration",),
    model_types=("qwen3_vl",),
    build_configs=build_configs,
    build_model=Qwen3VLModel,
    weight_table=weight_table,
    layouts=LAYOUTS,
    components={
        # the learned position table belongs to the ViT; DeepStack mergers project like the merger
        "vision": ("vision.patch_embed.", "vision.pos_embed.", "vision.layers."),
        "projector": ("vision.merger.", "vision.deepstack_mergers."),
        "language_model": ("language_model.",),
    },
    hf_module_prefixes={},  # hub names already are the in-memory module paths
    media_keys=("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"),
    position_ids=position_ids,
    hf_vision_module="model.visual",
    tiny_builder="vlm_bridge.testing.tiny_qwen3_vl:build_tiny_qwen3_vl",
    recipes={k: v for k, v in RECIPES.items() if "a3b" not in k},
)
# The MoE variant shares everything; config.py and mapping.py switch on the expert count.
MOE_FAMILY = dataclasses.replace(
    FAMILY, name="qwen3_vl_moe", architectures=("Qwen3VLMoeForConditionalGeneration",),
    model_types=("qwen3_vl_moe",), tiny_variants={"default": {"moe": True}},
    recipes={k: v for k, v in RECIPES.items() if "a3b" in k},
)

FAMILIES = [FAMILY, MOE_FAMILY]
