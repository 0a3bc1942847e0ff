"""Qwen2.5-VL recipes (3B/7B/32B/72B, full SFT and LoRA). The model shape comes from the
checkpoint given with ``--pretrained``; a recipe sets parallelism and training only.

Layouts target H200-class GPUs (141 GB): SFT keeps fp32 master weights and Adam state in the
distributed optimizer, so memory per GPU is roughly 18 bytes/parameter / (TP*PP*DP) plus
activations; LoRA needs only the bf16 weights plus adapter state.
"""

from __future__ import annotations

from vlm_bridge.recipes.build import lora_recipe, sft_recipe

# size -> (SFT tp, SFT pp, LoRA tp, LoRA pp)
LAYOUTS = {"3b": (1, 1, 1, 1), "7b": (2, 1, 1, 1), "32b": (8, 1, 4, 1), "72b": (8, 4, 8, 1)}
RECIPES = {
    **{f"qwen2_5_vl_{s}_sft": (lambda s=s: sft_recipe(f"qwen2_5_vl_{s}_sft", *LAYOUTS[s][:2],
                                                       recompute=s in ("32b", "72b"))) for s in LAYOUTS},
    **{f"qwen2_5_vl_{s}_lora": (lambda s=s: lora_recipe(f"qwen2_5_vl_{s}_lora", *LAYOUTS[s][2:]))
       for s in LAYOUTS},
}
