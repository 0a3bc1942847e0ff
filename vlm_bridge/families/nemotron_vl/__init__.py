"""Nemotron VL on Megatron-Core: transformers' NemotronH_Omni_Reasoning_V3 (both its key layouts)
and the original NemotronH_Nano_VL_V2 hub folders (read without their remote code)."""

from __future__ import annotations

import torch

from vlm_bridge.families.base import Family, ForeignForm
from vlm_bridge.families.nemotron_vl.config import NemotronVLSettings, build_configs
from vlm_bridge.families.nemotron_vl.mapping import LAYOUTS, weight_table
from vlm_bridge.families.nemotron_vl.model import NemotronVLModel
from vlm_bridge.families.nemotron_vl.recipes import RECIPES
from vlm_bridge.families.nemotron_vl.v2_config import V2_ARCHITECTURE, translate_v2_config
from vlm_bridge.families.nemotron_vl.v2_processor import load_v2_processor


def position_ids(s: NemotronVLSettings, batch: dict) -> torch.Tensor:
    """Plain 0..s-1 per row; unused by the model (Nemotron-H attention has no positions), kept so
    that every family hands the trainer the same inputs."""
    b, n = batch["input_ids"].shape
    return torch.arange(n, device=batch["input_ids"].device).expand(b, n)


def check_passthrough(hf_config, name: str, tensor: torch.Tensor) -> None:
    """LayerScales pass through only when they are the identity (C-RADIO has none)."""
    if "layer_scale" in name and not bool((tensor == 1).all()):
        raise ValueError(f"{name}: RADIO LayerScale other than 1 is not supported")


FAMILIES = [
    Family(
        name="nemotron_vl",
        architectures=("NemotronH_Omni_Reasoning_V3",),
        model_types=("nemotron_h_omni",),
        build_configs=build_configs,
        build_model=NemotronVLModel,
        weight_table=weight_table,
        layouts=LAYOUTS,
        components={
            "vision": ("vision.patch_projection.", "vision.video_patch_projection.",
                       "vision.position_embedding.", "vision.cls_register_token.", "vision.layers."),
            "projector": ("vision.projector.",),
            "language_model": ("language_model.",),
        },
        # canonical names are transformers 5.24's in-memory module paths already
        hf_module_prefixes={},
        media_keys=("pixel_values", "image_grid_hw", "pixel_values_videos"),
        modalities=("image", "video"),
        # transformers' processor takes videos with a single prompt only, and its model cannot
        # take images and a video in one forward (both fill the image placeholder)
        video_batch_alone=True,
        position_ids=position_ids,
        hf_vision_module="multi_modal_projector",
        tiny_builder="vlm_bridge.testing.tiny_nemotron_vl:build_tiny_nemotron_vl",
        recipes=RECIPES,
        no_context_parallel=("its Mamba-2 layers carry a state along the whole sequence, which would "
                             "have to pass from rank to rank"),
        # HF decodes Mamba steps without the time_step_min floor its chunked scan applies (we
        # follow it); with the floor out of reach, decoding from the cache equals a full forward
        tiny_decode_options={"time_step_min": 1e-6},
        # RADIO's summary-token indices, identity LayerScales, input statistics: not weights
        passthrough=(r"(^|\.)summary_idxs$", r"\.layer_scale[12]\.lambda1$",
                     r"input_conditioner\.norm_(mean|std)$"),
        check_passthrough=check_passthrough,
        foreign_forms={V2_ARCHITECTURE: ForeignForm(config=translate_v2_config, processor=load_v2_processor)},
        # the V2 upload's tokenizer has no pad token, so neither has its tiny form
        tiny_variants={"default": {}, "v2": {"form": "v2", "pad_token": False}, "moe": {"moe": True}},
    )
]
