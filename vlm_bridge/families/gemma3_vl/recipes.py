"""Gemma 3 VL recipes (4B/12B/27B, full SFT and LoRA); the model shape comes from ``--pretrained``.

Layouts for H200-class GPUs (141 GB). Full SFT keeps fp32 master weights and Adam state in the
distributed optimizer (about 18 bytes/parameter over TP*PP*DP ranks) plus activations: 4B fits one
GPU, 12B needs TP=2, 27B TP=4 (or TP=8 with room for longer sequences); recomputation on the large
ones. LoRA needs the bf16 weights plus adapters: 4B and 12B on one GPU, 27B at TP=2. The vocabulary
is 262,208 rows, so the output layer and its logits dominate activations at short sequences.
"""

from __future__ import annotations

from vlm_bridge.train.config import OptimSettings, ParallelSettings, PeftSettings, TrainConfig

# size -> (SFT tp, SFT pp, LoRA tp, LoRA pp)
LAYOUTS = {"4b": (1, 1, 1, 1), "12b": (2, 1, 1, 1), "27b": (4, 1, 2, 1)}


def _sft(size: str) -> TrainConfig:
    tp, pp, _, _ = LAYOUTS[size]
    return TrainConfig(
        name=f"gemma3_vl_{size}_sft", output_dir=f"runs/gemma3_vl_{size}_sft", steps=1000,
        global_batch_size=32, parallel=ParallelSettings(tp=tp, pp=pp),
        optim=OptimSettings(lr=1e-5, min_lr=1e-6, warmup_steps=50, vision_lr=2e-6),
        recompute=size != "4b",
    )


def _lora(size: str) -> TrainConfig:
    _, _, tp, pp = LAYOUTS[size]
    return TrainConfig(
        name=f"gemma3_vl_{size}_lora", output_dir=f"runs/gemma3_vl_{size}_lora", steps=1000,
        global_batch_size=32, parallel=ParallelSettings(tp=tp, pp=pp),
        optim=OptimSettings(lr=1e-4, min_lr=1e-5, warmup_steps=50),
        peft=PeftSettings(method="lora", rank=16, alpha=32.0),
    )


RECIPES = {
    **{f"gemma3_vl_{s}_sft": (lambda s=s: _sft(s)) for s in LAYOUTS},
    **{f"gemma3_vl_{s}_lora": (lambda s=s: _lora(s)) for s in LAYOUTS},
}
