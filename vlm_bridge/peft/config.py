"""LoRA / DoRA hyper-parameters (shared by the wrapper layer and the model transform)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    components: tuple[str, ...] = ("language_model",)
    use_dora: bool = False
    seed: int = 0  # lora_A init: drawn per module from (seed, global name), so identical at any TP

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
