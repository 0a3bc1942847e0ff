"""Qwen3-VL: HF config -> Megatron-Core configs, in one explicit function.

Fields HF leaves implicit get the values of its modeling code: ``mrope_section`` defaults to
[24, 20, 20] and is always applied interleaved (t, h, w, t, h, w, ...); the ViT LayerNorms and the
merger norms use a hard-coded epsilon of 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._qwen.config import qwen_language_config, qwen_vision_config
from vlm_bridge.families._qwen.settings import QwenVLSettings, check_divisibility, qwen_vl_settings

HF_DEFAULT_MROPE_SECTION = [24, 20, 20]
VISION_NORM_EPS = 1e-6


@dataclass
class Qwen3VLSettings(QwenVLSettings):
    num_position_embeddings: int
    deepstack_visual_indexes: list[int]
    # Qwen3-VL places every video frame in its own vision span (timestamps between them), so
    # positions advance per frame and never scale with time.
    tokens_per_second: float = 1.0


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def check_layout(hf_config, tp: int, pp: int) -> None:
    check_divisibility(hf_config, tp, pp)
    text, vision = hf_config.text_config, hf_config.vision_config
    per_stage = text.num_hidden_layers // pp
    deepstack = len(vision.deepstack_visual_indexes)
    if per_stage < deepstack:
        raise ValueError(
            f"--pp {pp} leaves {per_stage} language layers on the first stage, fewer than the "
            f"{deepstack} DeepStack injection layers that must live there"
        )


def _moe_kwargs(text, ep: int) -> dict:
    """Megatron MoE settings for Qwen3-VL-MoE: softmax over the top-k logits equals HF's softmax
    over all experts followed by renormalising the top k, which Qwen3-VL-MoE always does."""
    experts = getattr(text, "num_experts", None)
    if not experts:
        if ep > 1:
            raise ValueError(f"--ep {ep} needs a mixture-of-experts model")
        return {}
    if getattr(text, "mlp_only_layers", []) or getattr(text, "decoder_sparse_step", 1) != 1:
        raise ValueError("Qwen3-VL-MoE with dense layers between MoE layers is not supported yet")
    if experts % ep:
        raise ValueError(f"--ep {ep} does not divide the number of experts ({experts})")
    return dict(
        num_moe_experts=experts,
        moe_router_topk=text.num_experts_per_tok,
        moe_ffn_hidden_size=text.moe_intermediate_size,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0),
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ep,
    )


def build_configs(
    hf_config, dtype: torch.dtype, tp: int = 1, pp: int = 1, ep: int = 1
) -> tuple[TransformerConfig, TransformerConfig, Qwen3VLSettings]:
    check_layout(hf_config, tp, pp)
    text, vision = hf_config.text_config, hf_config.vision_config
    if text.hidden_act != "silu" or vision.hidden_act != "gelu_pytorch_tanh":
        raise ValueError("Qwen3-VL with other activations than silu / gelu_pytorch_tanh is unsupported")
    language = qwen_language_config(
        text, dtype, tp, pp, family="Qwen3-VL", default_mrope_section=HF_DEFAULT_MROPE_SECTION,
        add_qkv_bias=bool(getattr(text, "attention_bias", False)), qk_layernorm=True,
        **_moe_kwargs(text, ep),
    )
    vision_cfg = qwen_vision_config(vision, dtype, tp, VISION_NORM_EPS, normalization="LayerNorm",
                                    gated_linear_unit=False, activation_func=_gelu_tanh,
                                    bias_activation_fusion=False)
    settings = Qwen3VLSettings(
        **qwen_vl_settings(hf_config, language, tp, default_rope_theta=5_000_000.0),
        num_position_embeddings=vision.num_position_embeddings,
        deepstack_visual_indexes=list(vision.deepstack_visual_indexes),
    )
    return language, vision_cfg, settings
