"""Qwen2.5-VL: HF config -> Megatron-Core configs, in one explicit function.

Every Megatron field that differs from its default is set here from the HF config; nothing is
inferred silently. Fields HF leaves implicit get the value HF's modeling code uses:
``mrope_section`` defaults to [16, 24, 24] and the vision RMSNorm epsilon is a hard-coded 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._qwen.config import qwen_language_config, qwen_vision_config
from vlm_bridge.families._qwen.settings import QwenVLSettings, check_divisibility, qwen_vl_settings

HF_DEFAULT_MROPE_SECTION = [16, 24, 24]
VISION_NORM_EPS = 1e-6  # Qwen2_5_VLVisionBlock builds its RMSNorms with eps=1e-6, not from config


@dataclass
class Qwen25VLSettings(QwenVLSettings):
    window_size: int
    fullatt_block_indexes: list[int]
    tokens_per_second: float


def build_configs(
    hf_config, dtype: torch.dtype, tp: int = 1, pp: int = 1, ep: int = 1
) -> tuple[TransformerConfig, TransformerConfig, Qwen25VLSettings]:
    """Translate a ``Qwen2_5_VLConfig`` into (language config, vision config, settings)."""
    check_divisibility(hf_config, tp, pp)
    if ep > 1:
        raise ValueError(f"--ep {ep} needs a mixture-of-experts model; Qwen2.5-VL is dense")
    text, vision = hf_config.text_config, hf_config.vision_config
    if vision.hidden_act != "silu" or text.hidden_act != "silu":
        raise ValueError("Qwen2.5-VL with a hidden_act other than silu is not supported")
    language = qwen_language_config(text, dtype, tp, pp, family="Qwen2.5-VL",
                                    default_mrope_section=HF_DEFAULT_MROPE_SECTION, add_qkv_bias=True)
    vision_cfg = qwen_vision_config(vision, dtype, tp, VISION_NORM_EPS, normalization="RMSNorm",
                                    gated_linear_unit=True, activation_func=F.silu)
    settings = Qwen25VLSettings(
        **qwen_vl_settings(hf_config, language, tp, default_rope_theta=1_000_000.0),
        window_size=vision.window_size,
        fullatt_block_indexes=list(vision.fullatt_block_indexes),
        tokens_per_second=vision.tokens_per_second,
    )
    return language, vision_cfg, settings
