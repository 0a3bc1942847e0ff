"""The two recipe shapes every family uses: full SFT and LoRA, with the family's layout.

Families keep only what differs (layouts per size, recomputation, LoRA targets); step counts,
batch sizes and learning rates are the same defaults everywhere and overridable with key=value.
"""

from __future__ import annotations

from vlm_bridge.train.config import OptimSettings, ParallelSettings, PeftSettings, TrainConfig


def sft_recipe(name: str, tp: int = 1, pp: int = 1, ep: int = 1, recompute: bool = False) -> TrainConfig:
    """Full fine-tuning: lr 1e-5 (vision 2e-6), 50 warmup steps, 1000 steps of 32 samples."""
    return TrainConfig(
        name=name, output_dir=f"runs/{name}", steps=1000, global_batch_size=32,
        parallel=ParallelSettings(tp=tp, pp=pp, ep=ep),
        optim=OptimSettings(lr=1e-5, min_lr=1e-6, warmup_steps=50, vision_lr=2e-6),
        recompute=recompute,
    )


def lora_recipe(name: str, tp: int = 1, pp: int = 1, ep: int = 1,
                targets: tuple[str, ...] | None = None, micro_batch_size: int = 1) -> TrainConfig:
    """LoRA rank 16, alpha 32, lr 1e-4 on the language model (``targets``: default linears);
    ``micro_batch_size`` packed rows per forward where activations leave room (fewer, larger
    kernels: less host time per token)."""
    peft = PeftSettings(method="lora", rank=16, alpha=32.0)
    if targets is not None:
        peft.targets = targets
    return TrainConfig(
        name=name, output_dir=f"runs/{name}", steps=1000, global_batch_size=32,
        parallel=ParallelSettings(tp=tp, pp=pp, ep=ep),
        optim=OptimSettings(lr=1e-4, min_lr=1e-5, warmup_steps=50), peft=peft,
        micro_batch_size=micro_batch_size,
    )
