"""Gemma 3 VL recipes (4B/12B/27B, full SFT and LoRA); the model shape comes from ``--pretrained``.

Layouts for H200-class GPUs (141 GB). Full SFT keeps fp32 master weights and Adam state in the
distributed optimizer (about 18 bytes/parameter over TP*PP*DP ranks) plus activations: 4B fits one
GPU, 12B needs TP=2, 27B TP=4 (or TP=8 with room for longer sequences); recomputation on the large
ones. LoRA needs the bf16 weights plus adapters: 4B and 12B on one GPU, 27B at TP=2. The vocabulary
is 262,208 rows, so the output layer and its logits dominate activations at short sequences.
4B LoRA runs four packed rows per micro-batch: its step is bound by host time per kernel launch,
and five rows of 4,096 tokens per micro-batch trained 1.30x faster than one at 97 GB peak
(``benchmarks/results_lora_gemma3_4b_micro_batch_h200.json``).
"""

from __future__ import annotations

from vlm_bridge.recipes.build import lora_recipe, sft_recipe

# size -> (SFT tp, SFT pp, LoRA tp, LoRA pp)
LAYOUTS = {"4b": (1, 1, 1, 1), "12b": (2, 1, 1, 1), "27b": (4, 1, 2, 1)}
RECIPES = {
    **{f"gemma3_vl_{s}_sft": (lambda s=s: sft_recipe(f"gemma3_vl_{s}_sft", *LAYOUTS[s][:2],
                                                      recompute=s != "4b")) for s in LAYOUTS},
    **{f"gemma3_vl_{s}_lora": (lambda s=s: lora_recipe(f"gemma3_vl_{s}_lora", *LAYOUTS[s][2:],
                                                        micro_batch_size=4 if s == "4b" else 1))
       for s in LAYOUTS},
}
