"""Qwen3-VL recipes: 8B dense and 30B-A3B MoE, full SFT and LoRA (shape from ``--pretrained``).

MoE LoRA targets the attention projections only: HF PEFT cannot address experts stored as fused
3-D tensors, so adapters on expert linears would not export as an HF-PEFT adapter.
"""

from __future__ import annotations

from vlm_bridge.train.config import OptimSettings, ParallelSettings, PeftSettings, TrainConfig


def _base(name: str, parallel: ParallelSettings, optim: OptimSettings, **kw) -> TrainConfig:
    return TrainConfig(name=name, output_dir=f"runs/{name}", steps=1000, global_batch_size=32,
                       parallel=parallel, optim=optim, **kw)


def qwen3_vl_8b_sft() -> TrainConfig:
    return _base("qwen3_vl_8b_sft", ParallelSettings(tp=2),
                 OptimSettings(lr=1e-5, min_lr=1e-6, warmup_steps=50, vision_lr=2e-6))


def qwen3_vl_8b_lora() -> TrainConfig:
    return _base("qwen3_vl_8b_lora", ParallelSettings(tp=1),
                 OptimSettings(lr=1e-4, min_lr=1e-5, warmup_steps=50),
                 peft=PeftSettings(method="lora", rank=16, alpha=32.0))


def qwen3_vl_30b_a3b_sft() -> TrainConfig:
    return _base("qwen3_vl_30b_a3b_sft", ParallelSettings(tp=1, ep=8),
                 OptimSettings(lr=1e-5, min_lr=1e-6, warmup_steps=50, vision_lr=2e-6),
                 recompute=True)


def qwen3_vl_30b_a3b_lora() -> TrainConfig:
    return _base("qwen3_vl_30b_a3b_lora", ParallelSettings(tp=1, ep=4),
                 OptimSettings(lr=1e-4, min_lr=1e-5, warmup_steps=50),
                 peft=PeftSettings(method="lora", rank=16, alpha=32.0,
                                   targets=("linear_qkv", "linear_proj")))


RECIPES = {f.__name__: f for f in (qwen3_vl_8b_sft, qwen3_vl_8b_lora, qwen3_vl_30b_a3b_sft,
                                   qwen3_vl_30b_a3b_lora)}
