"""Gemma 3 VL (4B/12B/27B) on Megatron-Core."""

from __future__ import annotations

import torch

from vlm_bridge.families.base import Family
from vlm_bridge.families.gemma3_vl.config import Gemma3VLSettings, build_configs
from vlm_bridge.families.gemma3_vl.mapping import LAYOUTS, weight_table
from vlm_bridge.families.gemma3_vl.model import Gemma3VLModel
from vlm_bridge.families.gemma3_vl.recipes import RECIPES


def position_ids(s: Gemma3VLSettings, batch: dict) -> torch.Tensor:
    """1-D positions 0..s-1 per row, padding included, as Gemma 3's forward computes them."""
    b, n = batch["input_ids"].shape
    return torch.arange(n, device=batch["input_ids"].device).expand(b, n)


FAMILIES = [
    Family(
        name="gemma3_vl",
        architectures=("Gemma3ForConditionalGeneration",),
        model_types=("gemma3",),
        build_configs=build_configs,
        build_model=Gemma3VLModel,
        weight_table=weight_table,
        layouts=LAYOUTS,
        components={
            "vision": ("vision.patch_embed.", "vision.position_embedding.", "vision.layers.",
                       "vision.post_layernorm."),
            "projector": ("vision.projector.",),
            "language_model": ("language_model.",),
        },
        # hub names -> transformers 5 module paths (it strips SigLIP's vision_model. on load)
        hf_module_prefixes={"language_model.model.": "model.language_model.",
                            "vision_tower.vision_model.": "model.vision_tower.",
                            "multi_modal_projector.": "model.multi_modal_projector."},
        media_keys=("pixel_values",),
        modalities=("image",),
        token_keys=("token_type_ids",),
        position_ids=position_ids,
        hf_vision_module="model.multi_modal_projector",
        tiny_builder="vlm_bridge.testing.tiny_gemma3_vl:build_tiny_gemma3_vl",
        recipes=RECIPES,
    )
]
