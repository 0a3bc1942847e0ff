"""Qwen2.5-VL recipes (3B/7B/32B/72B, full SFT and LoRA). The model shape comes from the
checkpoint given with ``--pretrained``; a recipe sets parallelism and training only.

Layouts target H200-class GPUs (141 GB): SFT keeps fp32 master weights and Adam state in the
distributed optimizer, so memory per GPU is roughly 18 bytes/parameter / (TP*PP*DP) plus
activations; LoRA needs only the bf16 weights plus adapter state.
"""

from __future__ import annotations

from vlm_bridge.train.config import (
    OptimSettings,
    ParallelSettings,
    PeftSettings,
    TrainConfig,
)

# size -> (SFT tp, SFT pp, LoRA tp, LoRA pp)
LAYOUTS = {"3b": (1, 1, 1, 1), "7b": (2, 1, 1, 1), "32b": (8, 1, 4, 1), "72b": (8, 4, 8, 1)}


def _sft(size: str) -> TrainConfig:
    tp, pp, _, _ = LAYOUTS[size]
    return TrainConfig(
        name=f"qwen2_5_vl_{size}_sft",
        output_dir=f"runs/qwen2_5_vl_{size}_sft",
        steps=1000,
        global_batch_size=32,
        parallel=ParallelSettings(tp=tp, pp=pp),
        optim=OptimSettings(lr=1e-5, min_lr=1e-6, warmup_steps=50, vision_lr=2e-6),
        recompute=size in ("32b", "72b"),
    )


def _peft(size: str) -> TrainConfig:
    _, _, tp, pp = LAYOUTS[size]
    return TrainConfig(
        name=f"qwen2_5_vl_{size}_lora",
        output_dir=f"runs/qwen2_5_vl_{size}_lora",
        steps=1000,
        global_batch_size=32,
        parallel=ParallelSettings(tp=tp, pp=pp),
        optim=OptimSettings(lr=1e-4, min_lr=1e-5, warmup_steps=50),
        peft=PeftSettings(method="lora", rank=16, alpha=32.0),
    )


RECIPES = {
    **{f"qwen2_5_vl_{s}_sft": (lambda s=s: _sft(s)) for s in LAYOUTS},
    **{f"qwen2_5_vl_{s}_lora": (lambda s=s: _peft(s)) for s in LAYOUTS},
}
