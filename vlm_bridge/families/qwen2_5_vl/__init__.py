"""Qwen2.5-VL (3B/7B/32B/72B) on Megatron-Core."""

from __future__ import annotations

from vlm_bridge.attention.core import AttentionMask
from vlm_bridge.families._common.mrope import mrope_position_ids
from vlm_bridge.families.base import Family
from vlm_bridge.families.qwen2_5_vl.config import Qwen25VLSettings, build_configs
from vlm_bridge.families.qwen2_5_vl.mapping import LAYOUTS, weight_table
from vlm_bridge.families.qwen2_5_vl.model import Qwen25VLModel


def prepare_inputs(s: Qwen25VLSettings, batch: dict) -> dict:
    """HF processor outputs -> :class:`Qwen25VLModel` forward kwargs (positions and mask built here)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    positions = mrope_position_ids(
        input_ids, mask, batch.get("image_grid_thw"), batch.get("video_grid_thw"),
        image_token_id=s.image_token_id, video_token_id=s.video_token_id,
        spatial_merge_size=s.spatial_merge_size, tokens_per_second=s.tokens_per_second,
        second_per_grid_ts=batch.get("second_per_grid_ts"),
    )
    return dict(
        input_ids=input_ids,
        position_ids=positions,
        attention_mask=AttentionMask.from_padding(mask),
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        pixel_values_videos=batch.get("pixel_values_videos"),
        video_grid_thw=batch.get("video_grid_thw"),
    )

FAMILY = Family(
    name="qwen2_5_vl",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    model_types=("qwen2_5_vl",),
    build_configs=build_configs,
    build_model=Qwen25VLModel,
    weight_table=weight_table,
    layouts=LAYOUTS,
    prepare_inputs=prepare_inputs,
)
