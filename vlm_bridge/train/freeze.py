"""Freeze flags and PEFT on a built model, combined in one documented order.

Each component (``language_model``, ``vision``, ``projector``; which parameters each holds is the
family's declaration, ``model.component_prefixes``) has a freeze flag that is True, False or unset:

* unset: the mode's default: trainable in full fine-tuning, frozen under LoRA/DoRA;
* True: frozen in either mode;
* False: trainable in either mode: under PEFT its base weights train fully next to the adapters.

Adapters always train. A run where nothing trains is an error, not a silent no-op.
"""

from __future__ import annotations

import torch

from vlm_bridge.train.config import FreezeSettings, PeftSettings


def component_of(name: str, components: dict[str, tuple[str, ...]]) -> str:
    """The component of a parameter; a parameter no component claims is a family bug, not a guess."""
    for component, prefixes in components.items():
        if name.startswith(prefixes):
            return component
    raise AssertionError(f"parameter {name} belongs to no component of the family: {components}")


def _is_adapter(name: str) -> bool:
    return ".lora_" in name or "lora_magnitude" in name


def apply_freeze_and_peft(model: torch.nn.Module, freeze: FreezeSettings, peft: PeftSettings) -> None:
    from vlm_bridge.peft.lora import fold_lora

    # A PEFT checkpoint as the pretrained model: its adapters (merged on load) become part of the
    # base weights, which full fine-tuning trains and new adapters start fresh on.
    fold_lora(model)
    if peft.method is not None:
        from vlm_bridge.peft.lora import LoraConfig, apply_lora

        if peft.method not in ("lora", "dora"):
            raise ValueError(f"peft.method must be lora, dora or none, not {peft.method!r}")
        apply_lora(model, LoraConfig(rank=peft.rank, alpha=peft.alpha, dropout=peft.dropout,
                                     targets=tuple(peft.targets), components=tuple(peft.components),
                                     use_dora=peft.method == "dora"))
    default_trainable = peft.method is None
    components = model.component_prefixes
    for name, param in model.named_parameters():
        if _is_adapter(name):
            param.requires_grad = True
            continue
        flag = getattr(freeze, component_of(name, components))
        param.requires_grad = default_trainable if flag is None else not flag
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: every component is frozen and no PEFT method is set")
