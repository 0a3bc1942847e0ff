"""Nemotron VL: HF config -> Megatron-Core configs and settings, in one explicit function.

Folders arrive here as the ``nemotron_h_omni`` config of transformers 5.24's
``NemotronH_Omni_Reasoning_V3``: read through ``AutoConfig``, or translated from an original
``NemotronH_Nano_VL_V2`` hub config (``v2_config.py``; its RADIO has no video tubelet embedder).
What is set here and why:

* the language model is a hybrid stack from ``layers_block_type`` (``linear_attention`` = Mamba-2
  ``M``, ``full_attention`` = attention ``*``, ``mlp`` = squared-ReLU MLP ``-``); attention has no
  positional encoding (Nemotron-H relies on the Mamba layers for order); the output layer is untied;
* Mamba-2: heads and groups split over TP, HF's ``dt >= time_step_min`` clamp (Megatron's kernels
  apply none), chunked scan with the checkpoint's ``chunk_size``;
* the RADIO tower: LayerNorm blocks with biases, exact GELU MLP of ``hidden * mlp_ratio``,
  cls + register tokens without positions, a CPE table of ``max_img_size / patch`` per side;
* the projector: RMSNorm (eps 1e-5) over ``4 * vision_hidden`` after a 0.5 pixel shuffle ->
  Linear -> squared ReLU -> Linear, no biases.

* MoE ``E`` layers: Megatron's MoE layer with HF's sigmoid router (computed in fp32 from an fp32
  weight, ``e_score_correction_bias`` as Megatron's expert bias: it picks the experts, the plain
  scores weigh them, normalised over the top k and scaled by ``routed_scaling_factor``; the bias
  is not updated by training, as HF never updates it), squared-ReLU experts without a gate and
  one shared expert, experts split over ``--ep``.

Refused with one line: multi-token-prediction layers, MoE variants Megatron's router cannot
reproduce (a latent projection, un-normalised top-k weights, group-limited routing other than
top-2 sums per group), SwiGLU RADIO variants, audio towers, pixel shuffles other than 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.mamba import MambaSettings
from vlm_bridge.families._common.megatron_config import (
    common_kwargs,
    require_divisible,
    vision_tower_config,
)
from vlm_bridge.families._common.vocab import padded_vocab_size

MAMBA, ATTENTION, MLP, MOE = "linear_attention", "full_attention", "mlp", "moe"
SYMBOLS = {MAMBA: "M", ATTENTION: "*", MLP: "-", MOE: "E"}


@dataclass
class NemotronVLSettings:
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float  # unused: Nemotron-H attention has no positional encoding
    layer_types: list[str]
    mamba: MambaSettings
    hidden_size: int
    image_token_id: int
    patch_size: int
    num_channels: int
    position_grid: int  # CPE table side (max_img_size / patch_size)
    num_prefix_tokens: int  # cls + register tokens
    temporal_patch_size: int | None  # frames per video tubelet (None: images only)
    vision_hidden_size: int
    projector_hidden_size: int
    downsample: int  # pixel-shuffle factor per side (2 for a ratio of 0.5)
    projector_norm_eps: float = 1e-5


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).pow(2)


def mamba_settings(text) -> MambaSettings:
    """As transformers' ``NemotronHMamba2Mixer`` runs: ``dt`` floored at ``time_step_min`` (it
    ignores ``time_step_limit``), projection biases from ``use_bias``."""
    return MambaSettings(
        num_heads=text.mamba_num_heads, head_dim=text.mamba_head_dim, n_groups=text.n_groups,
        d_state=text.ssm_state_size, d_conv=text.conv_kernel, chunk_size=text.chunk_size,
        time_step_min=float(text.time_step_min), time_step_limit=(0.0, math.inf),
        norm_eps=float(text.layer_norm_epsilon), conv_bias=bool(text.use_conv_bias),
        proj_bias=bool(text.use_bias),
    )


def _refuse_unsupported(hf_config) -> None:
    text, vision = hf_config.text_config, hf_config.vision_config
    if getattr(hf_config, "audio_config", None) is not None:
        raise ValueError("Nemotron VL with an audio tower (audio_config) is not supported: "
                         "images and video only")
    unknown = set(text.layers_block_type) - {MAMBA, ATTENTION, MLP, MOE}
    if unknown:
        raise ValueError(f"Nemotron VL layer types {sorted(unknown)} are not supported (M, *, -, E)")
    if MOE in text.layers_block_type:
        _refuse_unsupported_moe(text)
    if getattr(text, "num_nextn_predict_layers", 0):
        raise ValueError("Nemotron VL with multi-token-prediction layers (num_nextn_predict_layers) "
                         "is not supported")
    if text.mlp_bias or text.use_bias:
        raise ValueError("Nemotron VL with MLP or Mamba projection biases (mlp_bias, use_bias) is not "
                         "supported (no checkpoint has them)")
    if getattr(vision, "use_swiglu_ffn", False):
        raise ValueError("RADIO towers with a SwiGLU FFN (use_swiglu_ffn) are not supported")
    if float(getattr(vision, "layerscale_value", 1.0)) != 1.0:
        raise ValueError("RADIO towers with LayerScale (layerscale_value != 1) are not supported")
    if float(hf_config.downsample_ratio) != 0.5:
        raise ValueError(f"Nemotron VL downsample_ratio {hf_config.downsample_ratio} is not supported (0.5)")
    if text.mlp_hidden_act != "relu2" or text.mamba_hidden_act != "silu" or vision.hidden_act != "gelu":
        raise ValueError("Nemotron VL activations other than relu2 (MLP), silu (Mamba), gelu (RADIO) "
                         "are not supported")
    if float(getattr(hf_config, "video_pruning_rate", 0.0) or 0.0) > 0:
        raise ValueError("Nemotron VL video_pruning_rate > 0 (Efficient Video Sampling) is not supported")


def _refuse_unsupported_moe(text) -> None:
    if getattr(text, "moe_latent_size", None) is not None:
        raise ValueError("Nemotron VL MoE with a latent projection (moe_latent_size) is not supported")
    if text.num_experts_per_tok > 1 and not text.norm_topk_prob:
        raise ValueError("Nemotron VL MoE with norm_topk_prob false is not supported (Megatron's sigmoid "
                         "router always normalises the top-k weights)")
    if text.n_group > 1 and text.num_experts_per_tok // text.topk_group != 2:
        raise ValueError(f"Nemotron VL MoE group-limited routing (n_group {text.n_group}, topk_group "
                         f"{text.topk_group}, top-{text.num_experts_per_tok}) is not supported: "
                         "Megatron scores a group by its top num_experts_per_tok / topk_group experts, "
                         "HF by its top 2")


def has_moe(text) -> bool:
    return MOE in text.layers_block_type


def moe_kwargs(text, ep: int) -> dict:
    """Megatron MoE settings reproducing ``NemotronHMoE`` (see the module docstring)."""
    if not has_moe(text):
        return {}
    kwargs = dict(
        num_moe_experts=text.n_routed_experts,
        moe_router_topk=text.num_experts_per_tok,
        moe_ffn_hidden_size=text.moe_intermediate_size,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_topk_scaling_factor=float(text.routed_scaling_factor),
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ep,
    )
    if text.n_shared_experts:
        kwargs["moe_shared_expert_intermediate_size"] = text.moe_shared_expert_intermediate_size
    if text.n_group > 1:
        kwargs.update(moe_router_num_groups=text.n_group, moe_router_group_topk=text.topk_group)
    return kwargs


def vision_ffn(vision) -> int:
    return int(vision.hidden_size * vision.mlp_ratio)


def check_layout(hf_config, tp: int, pp: int, ep: int) -> None:
    text, vision = hf_config.text_config, hf_config.vision_config
    if ep > 1 and not has_moe(text):
        raise ValueError(f"--ep {ep} needs a mixture-of-experts model; this Nemotron VL is dense")
    if has_moe(text):
        require_divisible([
            ("MoE experts", text.n_routed_experts, ep, "--ep"),
            ("MoE expert FFN size", text.moe_intermediate_size, tp, "--tp"),
            ("MoE shared-expert FFN size", text.moe_shared_expert_intermediate_size, tp, "--tp"),
        ])
    require_divisible([
        ("language attention heads", text.num_attention_heads, tp, "--tp"),
        ("language key/value heads", text.num_key_value_heads, tp, "--tp"),
        ("language FFN size", text.intermediate_size, tp, "--tp"),
        ("Mamba heads", text.mamba_num_heads, tp, "--tp"),
        ("Mamba groups", text.n_groups, tp, "--tp"),
        ("vision attention heads", vision.num_attention_heads, tp, "--tp"),
        ("vision FFN size", vision_ffn(vision), tp, "--tp"),
        ("projector hidden size", hf_config.projector_hidden_size, tp, "--tp"),
        ("language layers", len(text.layers_block_type), pp, "--pp"),
    ])


def build_configs(
    hf_config, dtype: torch.dtype, tp: int = 1, pp: int = 1, ep: int = 1
) -> tuple[TransformerConfig, TransformerConfig, NemotronVLSettings]:
    _refuse_unsupported(hf_config)
    check_layout(hf_config, tp, pp, ep)
    text, vision = hf_config.text_config, hf_config.vision_config
    if hf_config.vision_hidden_size != vision.hidden_size:
        raise ValueError(f"vision_hidden_size {hf_config.vision_hidden_size} differs from the RADIO "
                         f"hidden size {vision.hidden_size}")
    language = TransformerConfig(
        num_layers=len(text.layers_block_type), hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size, num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads, kv_channels=text.head_dim,
        layernorm_epsilon=text.layer_norm_epsilon, normalization="RMSNorm",
        # transformers' Nemotron-H attention has no biases whatever ``attention_bias`` says
        add_bias_linear=False, add_qkv_bias=False,
        gated_linear_unit=False, activation_func=squared_relu,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        # Layers differ in their parameters (M, *, -): checkpoints key each layer on its own.
        hetereogenous_dist_checkpoint=True,
        **{**common_kwargs(dtype), "bias_activation_fusion": False},
        **moe_kwargs(text, ep),
    )
    vision_cfg = vision_tower_config(
        layers=vision.num_hidden_layers, hidden=vision.hidden_size, ffn=vision_ffn(vision),
        heads=vision.num_attention_heads, norm_eps=vision.layer_norm_eps, dtype=dtype, tp=tp,
        normalization="LayerNorm", gated_linear_unit=False, activation_func=F.gelu,
        add_qkv_bias=bool(vision.qkv_bias), bias_activation_fusion=False,
    )
    settings = NemotronVLSettings(
        vocab_size=text.vocab_size,
        padded_vocab_size=padded_vocab_size(text.vocab_size, tp),
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        layer_types=list(text.layers_block_type),
        mamba=mamba_settings(text),
        hidden_size=text.hidden_size,
        image_token_id=hf_config.image_token_id,
        patch_size=vision.patch_size,
        num_channels=vision.num_channels,
        position_grid=vision.max_img_size // vision.patch_size,
        num_prefix_tokens=vision.num_cls_tokens + vision.num_registers,
        temporal_patch_size=vision.video_temporal_patch_size,
        vision_hidden_size=vision.hidden_size,
        projector_hidden_size=hf_config.projector_hidden_size,
        downsample=round(1 / float(hf_config.downsample_ratio)),
    )
    if text.tie_word_embeddings:
        raise ValueError("Nemotron VL with tied output embeddings is not supported (no checkpoint has one)")
    return language, vision_cfg, settings
