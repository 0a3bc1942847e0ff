"""Qwen3-VL (dense 2B-32B, MoE 30B-A3B / 235B-A22B) on Megatron-Core."""

from __future__ import annotations

import dataclasses

import torch

from vlm_bridge.attention.core import AttentionMask
from vlm_bridge.families._common.mrope import mrope_position_ids
from vlm_bridge.families.base import Family
from vlm_bridge.families.qwen3_vl.config import Qwen3VLSettings, build_configs
from vlm_bridge.families.qwen3_vl.mapping import LAYOUTS, weight_table
from vlm_bridge.families.qwen3_vl.model import Qwen3VLModel


def prepare_inputs(s: Qwen3VLSettings, batch: dict) -> dict:
    """Each video frame is its own vision span (timestamps between frames), so positions use
    the video grid split per frame, advancing like images."""
    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    videos = batch.get("video_grid_thw")
    frames = None
    if videos is not None:
        frames = torch.repeat_interleave(videos, videos[:, 0], dim=0)
        frames[:, 0] = 1
    positions = mrope_position_ids(
        input_ids, mask, batch.get("image_grid_thw"), frames,
        image_token_id=s.image_token_id, video_token_id=s.video_token_id,
        spatial_merge_size=s.spatial_merge_size, tokens_per_second=s.tokens_per_second,
    )
    return dict(
        input_ids=input_ids, position_ids=positions,
        attention_mask=AttentionMask.from_padding(mask),
        pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
        pixel_values_videos=batch.get("pixel_values_videos"), video_grid_thw=videos,
    )


FAMILY = Family(
    name="qwen3_vl",
    architectures=("Qwen3VLForConditionalGeneration",),
    model_types=("qwen3_vl",),
    build_configs=build_configs,
    build_model=Qwen3VLModel,
    weight_table=weight_table,
    layouts=LAYOUTS,
    prepare_inputs=prepare_inputs,
)
# The MoE variant shares everything; config.py and mapping.py switch on the expert count.
MOE_FAMILY = dataclasses.replace(
    FAMILY, name="qwen3_vl_moe", architectures=("Qwen3VLMoeForConditionalGeneration",),
    model_types=("qwen3_vl_moe",),
)
