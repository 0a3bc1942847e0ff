"""TransformerConfig fields every family sets the same way (dtype, no dropout, local kernels)."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.compat.cpu import cuda_available
from vlm_bridge.families._common import fused_rope


def skip_init(weight: torch.Tensor) -> None:
    """No-op initialiser; every parameter is overwritten by conversion or a checkpoint load."""


def common_kwargs(dtype: torch.dtype) -> dict:
    return dict(
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Megatron's fused SwiGLU and bias-dropout-add (torch.compile kernels) on GPUs only: CPU
        # runs stay eager so tests need no compiler.
        bias_activation_fusion=cuda_available(),
        bias_dropout_fusion=cuda_available(),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # RoPE as one Triton kernel per direction on GPUs (fused_rope.py), in Megatron's slot for
        # Transformer Engine's; Megatron's torch ops elsewhere.
        apply_rope_fusion=cuda_available() and fused_rope.install(),
        # Weights always come from a checkpoint: allocate shards in place (this path also tags
        # parameters with their TP partition metadata, which conversion relies on) and skip init.
        use_cpu_initialization=False,
        perform_initialization=True,
        init_method=skip_init,
        output_layer_init_method=skip_init,
    )


# Vision FFN widths are zero-padded to a multiple of this (exact: see convert.ops.PadDim), so that
# every power-of-two TP up to 8 splits them (a ViT FFN of 3420 does not divide 8) while the
# checkpoint's shapes stay the same at every TP.
VISION_FFN_MULTIPLE = 8


def padded_vision_ffn(size: int) -> int:
    return -(-size // VISION_FFN_MULTIPLE) * VISION_FFN_MULTIPLE


def require_divisible(checks: list[tuple[str, int, int, str]]) -> None:
    """One-line errors for layouts a model cannot be split into (before Megatron asserts).

    Each check is ``(what, size, parts, flag)``, e.g. ``("vision FFN size", 3420, 8, "--tp")``.
    """
    for what, size, parts, flag in checks:
        if size % parts:
            raise ValueError(f"{flag} {parts} does not divide the {what} ({size})")


def vision_tower_config(*, layers: int, hidden: int, ffn: int, heads: int, norm_eps: float,
                        dtype: torch.dtype, tp: int, **family_fields) -> TransformerConfig:
    """The TransformerConfig of a ViT: biased linears, full multi-head attention, whole on the first
    pipeline stage; ``family_fields`` set its norm and MLP kind."""
    fields = dict(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=heads, kv_channels=hidden // heads, layernorm_epsilon=norm_eps,
        add_bias_linear=True, add_qkv_bias=True, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,  # the vision tower lives whole on the first stage
        **common_kwargs(dtype),
    )
    return TransformerConfig(**{**fields, **family_fields})


def decoder_config(text_config, dtype: torch.dtype, tp: int, pp: int, **family_fields) -> TransformerConfig:
    """The TransformerConfig of a GQA decoder with RMSNorm and a gated MLP from an HF
    ``text_config`` (head_dim from the config, else hidden / heads; no linear biases unless
    ``attention_bias``); ``family_fields`` add to or override these fields."""
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads)
    fields = dict(
        num_layers=text_config.num_hidden_layers, hidden_size=text_config.hidden_size,
        ffn_hidden_size=text_config.intermediate_size,
        num_attention_heads=text_config.num_attention_heads,
        num_query_groups=text_config.num_key_value_heads, kv_channels=head_dim,
        layernorm_epsilon=text_config.rms_norm_eps,
        add_bias_linear=bool(getattr(text_config, "attention_bias", False)),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, normalization="RMSNorm",
        gated_linear_unit=True, **common_kwargs(dtype),
    )
    return TransformerConfig(**{**fields, **family_fields})
