"""The demo recipe: the tiny test model on the synthetic shapes task (any family's tiny model)."""

from __future__ import annotations

from vlm_bridge.train.config import DataSettings, OptimSettings, TrainConfig


def demo_tiny() -> TrainConfig:
    """The demo's tiny model on the synthetic shapes task: fast on 2 CPU cores."""
    return TrainConfig(
        name="demo_tiny",
        output_dir="runs/demo_tiny",
        dtype="fp32",
        steps=120,
        log_every=10,
        micro_batch_size=4,
        global_batch_size=8,
        tensorboard=False,
        optim=OptimSettings(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.0),
        data=DataSettings(seq_len=512, pack=True),
    )


