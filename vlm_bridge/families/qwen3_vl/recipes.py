"""Qwen3-VL recipes: 8B dense and 30B-A3B MoE, full SFT and LoRA (shape from ``--pretrained``).

MoE LoRA targets the attention projections only: HF PEFT cannot address experts stored as fused
3-D tensors, so adapters on expert linears would not export as an HF-PEFT adapter.
"""

from __future__ import annotations

from vlm_bridge.recipes.build import lora_recipe, sft_recipe

RECIPES = {
    "qwen3_vl_8b_sft": lambda: sft_recipe("qwen3_vl_8b_sft", tp=2),
    "qwen3_vl_8b_lora": lambda: lora_recipe("qwen3_vl_8b_lora"),
    "qwen3_vl_30b_a3b_sft": lambda: sft_recipe("qwen3_vl_30b_a3b_sft", ep=8, recompute=True),
    "qwen3_vl_30b_a3b_lora": lambda: lora_recipe("qwen3_vl_30b_a3b_lora", ep=4,
                                                 targets=("linear_qkv", "linear_proj")),
}
