"""Parameter-efficient fine-tuning on built Megatron models: LoRA / DoRA and HF-PEFT export."""

from vlm_bridge.peft.hf_export import export_hf_peft
from vlm_bridge.peft.lora import (
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    apply_lora,
    lora_modules,
    merge_lora,
    randomize_adapters_,
    unmerge_lora,
)

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "adapter_state_dict",
    "apply_lora",
    "export_hf_peft",
    "lora_modules",
    "merge_lora",
    "randomize_adapters_",
    "unmerge_lora",
]
