"""Nemotron VL recipes (Nemotron Nano 12B v2 VL, full SFT and LoRA); the model shape comes from
``--pretrained``.

Layouts for H200-class GPUs (141 GB). Full SFT keeps fp32 master weights and Adam state (about
18 bytes/parameter, ~230 GB for 12.6B) over TP*DP ranks: TP=2 with the distributed optimizer over
at least 2 data-parallel ranks, recomputation on. LoRA needs the bf16 weights (25 GB) plus adapters
and activations: one GPU. LoRA adapts the Mamba projections as well as attention and MLP linears:
most of the 62 layers are Mamba layers.
"""

from __future__ import annotations

from vlm_bridge.recipes.build import lora_recipe, sft_recipe

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")

RECIPES = {
    "nemotron_nano_v2_vl_12b_sft": lambda: sft_recipe("nemotron_nano_v2_vl_12b_sft", 2, 1, recompute=True),
    "nemotron_nano_v2_vl_12b_lora": lambda: lora_recipe("nemotron_nano_v2_vl_12b_lora", 1, 1,
                                                        targets=LORA_TARGETS),
}
