"""Build a tiny but real Qwen3-VL (dense or MoE) checkpoint folder, fully offline.

The Qwen3-VL counterpart of :mod:`vlm_bridge.testing.tiny_qwen2_5_vl`: stock
``transformers`` loads the folder exactly like a hub checkpoint, yet a CPU
forward takes well under a second. Every Qwen3-VL feature is kept at toy size:

* text: GQA (4 query / 2 KV heads), explicit ``head_dim``, per-head q/k RMSNorm,
  no attention bias, interleaved M-RoPE (``mrope_section`` [4, 2, 2] over the
  8 rotary frequencies), a 300-token vocabulary (not a multiple of 128);
* vision: 16-px patches folded over 2 frames, a learned 8x8 position grid
  (``num_position_embeddings`` 64) that is bilinearly resampled to every image
  grid other than 8x8, 2-D axial vision RoPE, 2x2 patch merging, and DeepStack:
  the outputs of vision blocks 1 and 2 go through their own post-shuffle-norm
  mergers and are added to the hidden states after LM layers 0 and 1;
* MoE variant: 4 experts, top-2 routing with renormalised top-k weights, every
  layer sparse, no shared expert.

Layout written by :func:`build_tiny_qwen3_vl` (transformers 5.24)::

    config.json                 nested text_config / vision_config; text_config.rope_parameters
                                holds rope_theta, mrope_section and mrope_interleaved
    generation_config.json      greedy decoding, eos = <|im_end|>, <|endoftext|>
    model.safetensors           hub key layout: model.language_model.*, model.visual.*,
                                lm_head.weight (absent when tied); MoE experts fused
                                per layer as 3-D tensors (see below)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    processor_config.json       Qwen3VLProcessor with Qwen2VLImageProcessor and
                                Qwen3VLVideoProcessor

MoE experts on disk, exactly as ``save_pretrained`` writes them: fused per layer,
in the in-memory (``nn.Linear``-like, out x in) layout, gate rows before up rows::

    model.language_model.layers.N.mlp.experts.gate_up_proj  [E, 2 * moe_inter, hidden]
    model.language_model.layers.N.mlp.experts.down_proj     [E, hidden, moe_inter]
    model.language_model.layers.N.mlp.gate.weight           [E, hidden]   (router)

The official Qwen hub checkpoints store the two expert tensors transposed
(``[E, hidden, 2 * moe_inter]`` and ``[E, moe_inter, hidden]``); transformers'
``qwen3_vl_moe`` conversion mapping (``Transpose(1, 2, check_dims=True)``) accepts
both by comparing shapes, and writes back whatever matches the module, i.e. the
layout above. ``moe_intermediate_size`` is chosen so no expert tensor is square
and the two layouts can always be told apart.

The tokenizer (byte-level BPE, Qwen2.5-VL special tokens and ids) is the one of
:mod:`vlm_bridge.testing.tiny_qwen2_5_vl`, with the Qwen3-VL chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vlm_bridge.testing.tiny_qwen2_5_vl import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_TOKEN_ID,
    SPECIAL_TOKEN_IDS,
    TINY_VOCAB_SIZE,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    make_tiny_tokenizer,
    save_tiny_checkpoint,
    seeded_tiny_model,
)

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKEN_IDS",
    "TINY_VOCAB_SIZE",
    "build_tiny_qwen3_vl",
    "make_tiny_qwen3_model",
    "make_tiny_qwen3_processor",
    "make_tiny_qwen3_tokenizer",
    "tiny_qwen3_vl_config",
]

# --- chat template -------------------------------------------------------------------------

# The media/ChatML part of the Qwen3-VL Instruct template (tool calling and reasoning
# content left out): unlike Qwen2.5-VL there is no default system turn; an image item
# renders as <|vision_start|><|image_pad|><|vision_end|> and a video item as
# <|vision_start|><|video_pad|><|vision_end|>. The processor, not the template, expands
# the single <|video_pad|> into "<t seconds><|vision_start|>pads<|vision_end|>" per
# temporal patch group, so the outer vision_start/vision_end pair stays around them.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --- model dimensions ----------------------------------------------------------------------

TEXT_HIDDEN_SIZE = 64
TEXT_NUM_HEADS = 4
TEXT_HEAD_DIM = 16
# Sums to head_dim / 2 = 8 rotary frequencies. Qwen3-VL interleaves the sections
# (frequency i goes to t, h, w for i % 3 == 0, 1, 2 while the h/w quotas last; the rest
# stay temporal), so an uneven split like the real [24, 20, 20] shows a mis-layout.
MROPE_SECTION = [4, 2, 2]
ROPE_THETA = 5_000_000.0
MAX_POSITION_EMBEDDINGS = 4096

TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN_SIZE,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": TEXT_NUM_HEADS,
    "num_key_value_heads": 2,
    "head_dim": TEXT_HEAD_DIM,
    "hidden_act": "silu",
    "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    # Hub configs write these under rope_scaling; transformers 5.24 reads them into
    # rope_parameters. The model always interleaves; mrope_interleaved is informative.
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": ROPE_THETA,
        "mrope_section": MROPE_SECTION,
        "mrope_interleaved": True,
    },
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
}

# Qwen3VLMoeTextConfig fields. Every layer is sparse ((i + 1) % 1 == 0, none listed in
# mlp_only_layers); the config has no shared expert and no norm_topk_prob field: the
# router always renormalises its top-k softmax weights.
TINY_MOE_TEXT_CONFIG: dict[str, Any] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    # Not 32: with hidden 64 that makes gate_up_proj square ([E, 64, 64]), and both the
    # loader's layout detection and any converter's shape checks become blind to a transpose.
    "moe_intermediate_size": 24,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
}

PATCH_SIZE = 16
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# An 8x8 learned position grid: any other patch grid is bilinearly interpolated.
NUM_POSITION_EMBEDDINGS = 64
DEEPSTACK_VISUAL_INDEXES = [1, 2]

TINY_VISION_CONFIG: dict[str, Any] = {
    "depth": 4,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "out_hidden_size": TEXT_HIDDEN_SIZE,
    "in_channels": 3,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": SPATIAL_MERGE_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "num_position_embeddings": NUM_POSITION_EMBEDDINGS,
    "deepstack_visual_indexes": DEEPSTACK_VISUAL_INDEXES,
    "initializer_range": 0.02,
}

# --- processor sizes ---------------------------------------------------------------------

# One merged unit is 32x32 px. Images: at least 2x2 units (64x64), at most 4x4 (128x128) of
# pixels, so 64x96 and 128x64 images (multiples of 32) are not resized: patch grids 6x4
# and 4x8, both different from the 8x8 learned position grid.
IMAGE_MIN_PIXELS = 64 * 64
IMAGE_MAX_PIXELS = 128 * 128
# Videos: the budget counts frames * height * width. A 4-frame 64x64 clip (16384) fits, so
# it stays 64x64: grid (2, 4, 4), i.e. two temporal groups of 4 merged tokens each.
VIDEO_MIN_PIXELS = 64 * 64
VIDEO_MAX_PIXELS = 4 * 128 * 128
# Frame sampling rate of the video processor; with clip metadata at the same fps every
# frame is kept (4 frames at 2 fps -> 4 frames), and timestamps are frame_index / fps.
VIDEO_FPS = 2.0
# Qwen3-VL normalises with mean = std = 0.5, not the CLIP constants of Qwen2/2.5-VL.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def tiny_qwen3_vl_config(
    moe: bool = False, tie_word_embeddings: bool = False, **overrides: Any
) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """Return the tiny Qwen3-VL (``moe=False``) or Qwen3-VL-MoE config, with overrides.

    ``text_config`` / ``vision_config`` overrides are dicts merged into the tiny
    defaults; any other keyword is a top-level config field. Special-token ids
    always match the tiny tokenizer.
    """
    text_defaults = {**TINY_TEXT_CONFIG, **(TINY_MOE_TEXT_CONFIG if moe else {})}
    if moe:
        # Qwen3VLMoeTextConfig defaults tie_word_embeddings to True; keep it in step with
        # the top-level flag (the one PreTrainedModel actually reads) to avoid a mixed message.
        text_defaults["tie_word_embeddings"] = tie_word_embeddings
    text_config = {**text_defaults, **overrides.pop("text_config", {})}
    vision_config = {**TINY_VISION_CONFIG, **overrides.pop("vision_config", {})}
    top_level: dict[str, Any] = {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "tie_word_embeddings": tie_word_embeddings,
        **overrides,
    }
    config_cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_cls(text_config=text_config, vision_config=vision_config, **top_level)


def make_tiny_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny Qwen2.5-VL byte-level BPE tokenizer (same ids) with the Qwen3-VL template."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_qwen3_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> Qwen3VLProcessor:
    """Build the Qwen3-VL processor with pixel budgets small enough for the tiny tests."""
    tokenizer = tokenizer if tokenizer is not None else make_tiny_qwen3_tokenizer()
    common: dict[str, Any] = {
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": SPATIAL_MERGE_SIZE,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}, **common
    )
    # cap_pixels_per_frame=True is the reference (qwen-vl-utils) behaviour and silences the
    # v5 deprecation warning; for clips this small it changes nothing.
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
        fps=VIDEO_FPS,
        cap_pixels_per_frame=True,
        **common,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _spread_router_weights(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Give each MoE router logits of order 1, so top-k picks differ from token to token.

    The stock init (std 0.02) makes all router logits nearly equal: routing then hinges on
    rounding noise and a converter that mis-orders experts could still look right.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5)


def make_tiny_qwen3_model(
    config: Qwen3VLConfig | Qwen3VLMoeConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration:
    """The tiny Qwen3-VL (or -MoE) with seeded weights and spread router rows."""
    moe = isinstance(config, Qwen3VLMoeConfig)
    model_cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    return seeded_tiny_model(model_cls, config, seed, dtype, extra_init=_spread_router_weights)


def build_tiny_qwen3_vl(
    out_dir: str | Path,
    *,
    moe: bool = False,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """Write a complete tiny Qwen3-VL (or Qwen3-VL-MoE) checkpoint folder; return its path.

    The folder loads offline with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``. Weights are deterministic in ``seed``;
    ``max_shard_size`` (e.g. ``"100KB"``) forces a sharded checkpoint with an index.
    """
    config = tiny_qwen3_vl_config(moe=moe, tie_word_embeddings=tie_word_embeddings)
    model = make_tiny_qwen3_model(config, seed=seed, dtype=dtype)
    return save_tiny_checkpoint(out_dir, model, make_tiny_qwen3_processor(), max_shard_size)
