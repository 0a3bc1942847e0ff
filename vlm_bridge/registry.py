"""Family lookup by HF ``architectures`` / ``model_type`` (a registry, not if/else)."""

from __future__ import annotations

from vlm_bridge.families.base import Family
from vlm_bridge.families.qwen2_5_vl import FAMILY as QWEN2_5_VL
from vlm_bridge.families.qwen3_vl import FAMILY as QWEN3_VL
from vlm_bridge.families.qwen3_vl import MOE_FAMILY as QWEN3_VL_MOE

FAMILIES: list[Family] = [QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE]


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.architectures)


def family_for_config(hf_config) -> Family:
    """The family for an HF config; a one-line error listing what is supported otherwise."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES:
        if any(a in family.architectures for a in archs) or model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported architecture {archs or model_type!r}; supported: "
        + ", ".join(supported_architectures())
    )


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; known: {[f.name for f in FAMILIES]}")
