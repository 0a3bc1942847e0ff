"""LoRA / DoRA hyper-parameters (shared by the wrapper layer and the model transform)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# PEFT's ``all-linear``: every linear of the components except the output layer.
ALL_LINEAR = "all-linear"
# transformers' names of the projections (as PEFT and ms-swift users give them) -> Megatron's
# layer names; Megatron fuses q, k and v (and gate and up), so one of them adapts the whole fused
# layer. ``out_proj`` is not mapped: Mamba mixers have a layer of that name.
HF_TARGET_NAMES = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv",
                   "qkv_proj": "linear_qkv", "qkv": "linear_qkv", "o_proj": "linear_proj",
                   "proj": "linear_proj", "gate_proj": "linear_fc1", "up_proj": "linear_fc1",
                   "down_proj": "linear_fc2", "fc1": "linear_fc1", "fc2": "linear_fc2"}
# Megatron's layer names some family has (a pipeline stage may hold none of a family's Mamba or
# attention layers, so a name absent from a stage is not wrong for that alone).
MEGATRON_TARGET_NAMES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


def megatron_targets(names: Iterable[str]) -> tuple[str, ...]:
    """LoRA target names as Megatron's layers are named (transformers' names mapped; order kept)."""
    return tuple(dict.fromkeys(HF_TARGET_NAMES.get(name, name) for name in names))


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
