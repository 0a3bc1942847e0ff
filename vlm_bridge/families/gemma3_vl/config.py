"""Gemma 3 VL: HF config -> Megatron-Core configs and settings, in one explicit function.

Read through ``AutoConfig`` (hub ``config.json`` files are sparse and rely on class defaults);
transformers 5 folds ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` into
``rope_parameters`` per layer type and ``sliding_window_pattern`` into ``layer_types``, so both
the hub's legacy fields and the new ones arrive here in the new form.

What is set here and why:

* attention scale ``query_pre_attn_scalar ** -0.5`` (27B: 168 vs head_dim 128), not 1/sqrt(head_dim);
* rotary per layer type: sliding layers use ``rope_parameters["sliding_attention"]`` (base 10k),
  full layers ``["full_attention"]`` (base 1M, linear scaling x8 in the real checkpoints); only
  ``default`` and ``linear`` rope types exist in Gemma 3 checkpoints and only those are accepted;
* GeGLU (GELU-tanh) MLP, no linear biases, q/k norms, four Gemma RMSNorms per layer (``1 + w``);
* the SigLIP tower: LayerNorm with biases, full attention, GELU-tanh MLP, post-layernorm, no head;
* ``attn_logit_softcapping`` is never applied by transformers' Gemma 3 and
  ``Gemma3ForConditionalGeneration`` applies no ``final_logit_softcapping``: neither is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common.megatron_config import (
    decoder_config,
    require_divisible,
    vision_tower_config,
)
from vlm_bridge.families._common.vocab import padded_vocab_size

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class Gemma3VLSettings:
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float  # of the full-attention layers (the shared model's default rotary)
    # per layer type: (base, linear scaling factor)
    rope: dict[str, tuple[float, float]]
    layer_types: list[str]
    sliding_window: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    mm_tokens_per_image: int
    image_size: int
    patch_size: int
    num_channels: int
    vision_norm_eps: float
    hidden_size: int


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _rope(text) -> dict[str, tuple[float, float]]:
    out = {}
    for kind in (SLIDING, FULL):
        params = dict((text.rope_parameters or {}).get(kind) or {})
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "linear"):
            raise ValueError(f"Gemma 3 {kind} rope_type {rope_type!r} is not supported (default, linear)")
        factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
        out[kind] = (float(params["rope_theta"]), factor)
    return out


def check_layout(hf_config, tp: int, pp: int, ep: int) -> None:
    text, vision = hf_config.text_config, hf_config.vision_config
    if ep > 1:
        raise ValueError(f"--ep {ep} needs a mixture-of-experts model; Gemma 3 is dense")
    checks = [
        ("language attention heads", text.num_attention_heads, tp, "--tp"),
        ("language key/value heads", text.num_key_value_heads, tp, "--tp"),
        ("language FFN size", text.intermediate_size, tp, "--tp"),
        ("vision attention heads", vision.num_attention_heads, tp, "--tp"),
        ("vision FFN size", vision.intermediate_size, tp, "--tp"),
        ("language hidden size (projector output)", text.hidden_size, tp, "--tp"),
        ("language layers", text.num_hidden_layers, pp, "--pp"),
    ]
    require_divisible(checks)


def build_configs(
    hf_config, dtype: torch.dtype, tp: int = 1, pp: int = 1, ep: int = 1
) -> tuple[TransformerConfig, TransformerConfig, Gemma3VLSettings]:
    check_layout(hf_config, tp, pp, ep)
    text, vision = hf_config.text_config, hf_config.vision_config
    if text.hidden_activation != "gelu_pytorch_tanh" or vision.hidden_act != "gelu_pytorch_tanh":
        raise ValueError("Gemma 3 with activations other than gelu_pytorch_tanh is not supported")
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is not supported")
    layer_types = list(text.layer_types)
    unknown = set(layer_types) - {SLIDING, FULL}
    if unknown:
        raise ValueError(f"Gemma 3 layer_types {sorted(unknown)} are not supported")
    language = decoder_config(
        text, dtype, tp, pp, qk_layernorm=True, activation_func=_gelu_tanh,
        softmax_scale=float(text.query_pre_attn_scalar) ** -0.5, bias_activation_fusion=False,
    )
    vision_cfg = vision_tower_config(
        layers=vision.num_hidden_layers, hidden=vision.hidden_size, ffn=vision.intermediate_size,
        heads=vision.num_attention_heads, norm_eps=vision.layer_norm_eps, dtype=dtype, tp=tp,
        normalization="LayerNorm", gated_linear_unit=False, activation_func=_gelu_tanh,
        bias_activation_fusion=False,
    )
    rope = _rope(text)
    settings = Gemma3VLSettings(
        vocab_size=text.vocab_size,
        padded_vocab_size=padded_vocab_size(text.vocab_size, tp),
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=rope[FULL][0],
        rope=rope,
        layer_types=layer_types,
        sliding_window=int(text.sliding_window),
        image_token_id=hf_config.image_token_id,
        boi_token_id=hf_config.boi_token_id,
        eoi_token_id=hf_config.eoi_token_id,
        mm_tokens_per_image=hf_config.mm_tokens_per_image,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_channels=vision.num_channels,
        vision_norm_eps=vision.layer_norm_eps,
        hidden_size=text.hidden_size,
    )
    if not getattr(hf_config, "tie_word_embeddings", True) or not getattr(text, "tie_word_embeddings", True):
        raise ValueError("Gemma 3 with untied output embeddings is not supported (no checkpoint has one)")
    return language, vision_cfg, settings
