"""Write a random-weight Qwen-VL, Gemma 3 or Nemotron VL HF folder at real dimensions, streaming.

The 7B checkpoint (~16.6 GB in bf16) is never held in memory: the HF model is built on the
``meta`` device only to enumerate parameter names and shapes, and each tensor is generated from
its own seed and streamed into 5 GB safetensors shards. Peak memory is one shard buffer plus the
largest tensor (the 152064 x 3584 embedding) in fp32.

Tokenizer and processor are the tiny ones from :mod:`vlm_bridge.testing.tiny_qwen2_5_vl` (no
network); the config's special-token ids are set to the tiny tokenizer's ids, while the vocab stays
152064, so ids above the tokenizer's 300 are simply never produced.

    python benchmarks/make_checkpoint.py --size 7b --out /data/qwen7b-random [--dtype bf16] [--tie]
    python benchmarks/make_checkpoint.py --size 7b --dry-run   # tensor count and bytes only
    python benchmarks/make_checkpoint.py --size gemma3_4b --out /data/gemma3-4b-random
    python benchmarks/make_checkpoint.py --size nemotron_12b --out /data/nemotron-12b-random

Gemma 3 (``gemma3_4b``, ``gemma3_12b``, ``gemma3_27b``; ``gemma3_tiny`` is the tiny builder's config
written the same way) follows the same recipe with the tiny Gemma tokenizer from
:mod:`vlm_bridge.testing.tiny_gemma3_vl`: the config carries its special-token ids (boi/eoi/image at
386-388 instead of 255999/256000/262144) and the vocab stays 262208. The keys are the hub upload's
(``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, no
``lm_head``: Gemma 3 is always tied, ``--tie`` is ignored), and the processor takes images to the
config's 896x896 with 256 soft tokens each, like google/gemma-3-4b-it's.

Nemotron VL (``nemotron_12b``: NVIDIA-Nemotron-Nano-12B-v2-VL dimensions as transformers 5.24's
``NemotronH_Omni_Reasoning_V3``; ``nemotron_tiny``: the tiny builder's config written the same way)
uses the tiny Nemotron tokenizer of :mod:`vlm_bridge.testing.tiny_nemotron_vl` (control ids 0-31,
``<image>`` 18; the vocab stays 131072). The keys are the in-memory names (the family's ``native``
layout, what ``save_pretrained(save_original_format=False)`` writes) without RADIO's identity
LayerScales (transformers re-creates them as 1.0, as for hub folders); the persistent buffer
``vision_model.summary_idxs`` is written with its real values. Mamba's ``A_log``, ``dt_bias`` and
``D`` get values of the usual Mamba-2 init (``A`` in [-16, -1], ``softplus(dt_bias)`` log-uniform
in [1e-3, 0.1], ``D`` near 1), not the generic draw. The processor takes images at their own grid
scaled into [1024, 4096] patches of 16 px (256-1024 image tokens after the 2x2 pixel shuffle: a
448 px square becomes 512 px, 896 px stays as is); ``--max-pixels`` does not apply.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from vlm_bridge.convert.hf_io import CheckpointError, ShardedSafetensorsWriter, atomic_output_dir
from vlm_bridge.testing import tiny_gemma3_vl as tiny_gemma
from vlm_bridge.testing import tiny_qwen2_5_vl as tiny

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARD_BYTES = 5 * 1024**3
# 448x448 px = 32x32 patches = 16x16 merged tokens = 256: the cap keeps benchmark inputs bounded
# while a 448x448 image is taken as is (a multiple of patch * merge = 28 px).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448


def qwen7b_config(tie: bool) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct dimensions, with the tiny tokenizer's special-token ids."""
    text = {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
        "use_sliding_window": False, "max_window_layers": 28, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                            "mrope_section": [16, 24, 24]},
        "bos_token_id": tiny.ENDOFTEXT_ID, "eos_token_id": tiny.IM_END_ID,
        "pad_token_id": tiny.ENDOFTEXT_ID,
    }
    vision = {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "hidden_act": "silu", "out_hidden_size": 3584, "in_channels": 3, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
    }
    # The real ids are 151655/151656/151652/151653; the tiny tokenizer emits 298/299/295/296.
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie,
        image_token_id=tiny.IMAGE_TOKEN_ID, video_token_id=tiny.VIDEO_TOKEN_ID,
        vision_start_token_id=tiny.VISION_START_ID, vision_end_token_id=tiny.VISION_END_ID,
    )


def qwen3_8b_config(tie: bool):
    """Qwen3-VL-8B-Instruct dimensions, with the tiny tokenizer's special-token ids."""
    from transformers import Qwen3VLConfig

    text = {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                            "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    }
    vision = {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
        "out_hidden_size": 4096, "patch_size": 16, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh",
    }
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie,
        image_token_id=tiny.IMAGE_TOKEN_ID, video_token_id=tiny.VIDEO_TOKEN_ID,
        vision_start_token_id=tiny.VISION_START_ID, vision_end_token_id=tiny.VISION_END_ID,
    )


def qwen3_30b_a3b_config(tie: bool, layers: int = 48):
    """Qwen3-VL-30B-A3B dimensions (128 experts, top-8), optionally with fewer LM layers."""
    from transformers import Qwen3VLMoeConfig

    text = {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": tie,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                            "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    }
    vision = {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
        "out_hidden_size": 2048, "patch_size": 16, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh",
    }
    return Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie,
        image_token_id=tiny.IMAGE_TOKEN_ID, video_token_id=tiny.VIDEO_TOKEN_ID,
        vision_start_token_id=tiny.VISION_START_ID, vision_end_token_id=tiny.VISION_END_ID,
    )


# Text dimensions of google/gemma-3-{4b,12b,27b}-it; everything else is shared (gemma3_config).
GEMMA3_TEXT = {
    "gemma3_4b": {"hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 10240,
                  "query_pre_attn_scalar": 256},
    "gemma3_12b": {"hidden_size": 3840, "num_hidden_layers": 48, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 15360,
                   "query_pre_attn_scalar": 256},
    # 168 = hidden / heads, not head_dim 128: the one size whose attention scale is not head_dim ** -0.5
    "gemma3_27b": {"hidden_size": 5376, "num_hidden_layers": 62, "num_attention_heads": 32,
                   "num_key_value_heads": 16, "head_dim": 128, "intermediate_size": 21504,
                   "query_pre_attn_scalar": 168},
}
GEMMA3_SIZES = (*GEMMA3_TEXT, "gemma3_tiny")
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # 5 local (sliding) layers, then 1 global


def gemma3_config(size: str):
    """Gemma 3 4B/12B/27B dimensions (or the tiny builder's), with the tiny tokenizer's special ids.

    Always tied, as every Gemma 3 checkpoint (and the Megatron family, which refuses untied ones).
    """
    if size == "gemma3_tiny":
        return tiny_gemma.tiny_gemma3_vl_config()
    layers = GEMMA3_TEXT[size]["num_hidden_layers"]
    pattern = GEMMA3_SLIDING_WINDOW_PATTERN
    text = {
        **GEMMA3_TEXT[size], "vocab_size": 262208, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "attention_bias": False,
        "attention_dropout": 0.0, "sliding_window": 1024,
        # Explicit layer_types plus the matching legacy pattern (the config would otherwise
        # serialise a default pattern that need not agree with the list).
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(layers)],
        "sliding_window_pattern": pattern,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "use_bidirectional_attention": False, "tie_word_embeddings": True,
        "pad_token_id": tiny_gemma.PAD_TOKEN_ID, "eos_token_id": tiny_gemma.EOS_TOKEN_ID,
        "bos_token_id": tiny_gemma.BOS_TOKEN_ID,
    }
    vision = {  # SigLIP so400m at 896 px: 64x64 = 4096 patches, pooled 4x4 -> 256 soft tokens
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_channels": 3, "image_size": 896,
        "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0, "vision_use_head": False,
    }
    from transformers import Gemma3Config

    # The real ids are 255999/256000/262144; the tiny tokenizer emits 386/387/388.
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=256,
        boi_token_index=tiny_gemma.BOI_TOKEN_ID, eoi_token_index=tiny_gemma.EOI_TOKEN_ID,
        image_token_index=tiny_gemma.IMAGE_TOKEN_ID,
        eos_token_id=[tiny_gemma.EOS_TOKEN_ID, tiny_gemma.END_OF_TURN_ID], tie_word_embeddings=True,
    )


def is_gemma3(size_or_config) -> bool:
    if isinstance(size_or_config, str):
        return size_or_config in GEMMA3_SIZES
    return size_or_config.model_type == "gemma3"


# NVIDIA-Nemotron-Nano-12B-v2(-VL): 62 layers, 28 Mamba-2 (M), 6 attention (*), 28 squared-ReLU MLP (-).
NEMOTRON_12B_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
NEMOTRON_BLOCKS = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
NEMOTRON_SIZES = ("nemotron_12b", "nemotron_tiny")
# Patches of 16 px per image before the 2x2 pixel shuffle: 256..1024 image tokens.
NEMOTRON_MIN_PATCHES, NEMOTRON_MAX_PATCHES = 1024, 4096
NEMOTRON_VIDEO_PATCHES = 1024  # per frame, the video processor's default


def is_nemotron(size_or_config) -> bool:
    if isinstance(size_or_config, str):
        return size_or_config in NEMOTRON_SIZES
    return size_or_config.model_type == "nemotron_h_omni"


def nemotron_config(size: str):
    """NVIDIA-Nemotron-Nano-12B-v2-VL dimensions (or the tiny builder's), with the tiny tokenizer's ids.

    RADIO ViT-H/16 with 10 prefix tokens (Megatron's RADIO class_token_len for this model; the
    2 cls + 8 registers split is not from the hub, and only the total matters to the forward), a
    CPE table for 2048 px; the projector's hidden is 4x the LM's MLP.
    """
    from transformers import NemotronH_Omni_Reasoning_V3_Config

    from vlm_bridge.testing import tiny_nemotron_vl as tiny_nemotron

    if size == "nemotron_tiny":
        return tiny_nemotron.tiny_nemotron_vl_config()
    if len(NEMOTRON_12B_PATTERN) != 62:
        raise AssertionError("the 12B pattern has 62 layers")
    text = {
        "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 20480,
        "layers_block_type": [NEMOTRON_BLOCKS[c] for c in NEMOTRON_12B_PATTERN],
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "attention_bias": False,
        "mlp_hidden_act": "relu2", "mlp_bias": False,
        "mamba_num_heads": 128, "mamba_head_dim": 80, "n_groups": 8, "ssm_state_size": 128,
        "conv_kernel": 4, "use_conv_bias": True, "use_bias": False, "mamba_proj_bias": False,
        "mamba_hidden_act": "silu", "expand": 2, "chunk_size": 128,
        "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": False, "max_position_embeddings": 131072,
        "num_nextn_predict_layers": 0, "tie_word_embeddings": False,
        "pad_token_id": tiny_nemotron.PAD_TOKEN_ID, "bos_token_id": tiny_nemotron.BOS_TOKEN_ID,
        "eos_token_id": tiny_nemotron.EOS_TOKEN_ID,
    }
    vision = {
        "hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "mlp_ratio": 4.0,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False,
        "num_channels": 3, "patch_size": 16, "image_size": 512, "max_img_size": 2048,
        "num_cls_tokens": 2, "num_registers": 8, "video_temporal_patch_size": 2,
    }
    # The real image id is 131072 (past the text vocab); the tiny tokenizer emits <image> = 18.
    return NemotronH_Omni_Reasoning_V3_Config(
        text_config=text, vision_config=vision, audio_config=None, force_image_size=512,
        downsample_ratio=0.5, projector_hidden_size=20480, vision_hidden_size=1280,
        video_temporal_patch_size=2, video_pruning_rate=0.0,
        image_token_id=tiny_nemotron.IMAGE_TOKEN_ID, video_token_id=None,
        audio_token_id=tiny_nemotron.SPECIAL_TOKEN_IDS["<so_embedding>"], tie_word_embeddings=False,
    )


def nemotron_constants(config) -> dict[str, torch.Tensor]:
    """Persistent non-weight buffers written with their real values (RADIO's summary-token indices)."""
    return {"vision_model.summary_idxs": torch.tensor(config.vision_config.summary_idxs, dtype=torch.long)}


def make_nemotron_processor():
    """The tiny Nemotron processor with this script's patch budget (module docstring)."""
    from vlm_bridge.testing import tiny_nemotron_vl as tiny_nemotron

    processor = tiny_nemotron.make_tiny_nemotron_processor()
    processor.image_processor.min_num_patches = NEMOTRON_MIN_PATCHES
    processor.image_processor.max_num_patches = NEMOTRON_MAX_PATCHES
    processor.video_processor.video_target_num_patches = NEMOTRON_VIDEO_PATCHES
    return processor


def build_config(size: str, tie: bool):
    if is_gemma3(size):
        return gemma3_config(size)
    if size == "qwen3_8b":
        return qwen3_8b_config(tie)
    if size.startswith("qwen3_30b_a3b"):  # qwen3_30b_a3b or qwen3_30b_a3b_<layers>l
        layers = int(size.rsplit("_", 1)[1][:-1]) if size.endswith("l") else 48
        return qwen3_30b_a3b_config(tie, layers)
    if is_nemotron(size):
        return nemotron_config(size)
    return qwen7b_config(tie) if size == "7b" else tiny.tiny_qwen2_5_vl_config(tie_word_embeddings=tie)


def hub_key(name: str) -> str:
    """transformers 5 in-memory parameter name -> the hub's on-disk key (Qwen2.5-VL only;
    Qwen3-VL keeps its in-memory names on disk)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    return name


# transformers 5 in-memory prefix -> the hub's on-disk one for Gemma 3 (5.x save_pretrained would
# write a flat vision_tower.*; the hub's vision_tower.vision_model.* is what downloads look like).
GEMMA3_HUB_PREFIXES = {"model.language_model.": "language_model.model.",
                       "model.vision_tower.": "vision_tower.vision_model.",
                       "model.multi_modal_projector.": "multi_modal_projector."}


def gemma3_hub_key(name: str) -> str:
    for memory, disk in GEMMA3_HUB_PREFIXES.items():
        if name.startswith(memory):
            return disk + name.removeprefix(memory)
    return name


def tensor_specs(config: Qwen2_5_VLConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(hub key, shape) of every saved tensor, from a meta-device model (allocates nothing)."""
    from transformers import AutoModelForImageTextToText

    qwen3 = config.model_type in ("qwen3_vl", "qwen3_vl_moe")
    gemma3 = is_gemma3(config)
    nemotron = is_nemotron(config)
    with torch.device("meta"):
        model = (AutoModelForImageTextToText.from_config(config) if qwen3 or gemma3 or nemotron
                 else Qwen2_5_VLForConditionalGeneration(config))
    if nemotron:  # in-memory names; the state dict adds the persistent buffer summary_idxs
        return sorted((n, tuple(t.shape)) for n, t in model.state_dict().items() if ".layer_scale" not in n)
    rename = gemma3_hub_key if gemma3 else (lambda n: n) if qwen3 else hub_key
    specs = [(rename(n), tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)]
    if config.tie_word_embeddings:  # HF does not save the tied output layer
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    return sorted(specs)


def gemma_rms_norm(key: str, shape: tuple[int, ...]) -> bool:
    """A Gemma RMSNorm weight (applied as 1 + w): every 1-D tensor of the Gemma decoder (it has no
    biases) and the projector's norm; the SigLIP tower's LayerNorms (plain w, with biases) are not."""
    return len(shape) == 1 and key.startswith(("language_model.", "multi_modal_projector."))


MAMBA_PARAMS = (".mixer.A_log", ".mixer.dt_bias", ".mixer.D")


def mamba_param(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """``A = -exp(A_log)`` in [-16, -1]; ``dt = softplus(dt_bias)`` log-uniform in [1e-3, 0.1]
    (``dt_bias`` is its inverse softplus); the skip ``D`` near 1."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if key.endswith(".A_log"):
        return torch.log(1 + 15 * u).float()
    if key.endswith(".dt_bias"):
        dt = torch.exp(math.log(1e-3) + u * (math.log(0.1) - math.log(1e-3)))
        return (dt + torch.log(-torch.expm1(-dt))).float()
    return (1 + 0.2 * (u - 0.5)).float()


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
                  norm_centre: float = 1.0) -> torch.Tensor:
    """Deterministic per key: a tensor's values do not depend on which others are written.

    ``norm_centre`` is where 1-D norm weights are drawn around: 1 for norms that scale by w, 0 for
    Gemma's that scale by 1 + w (around 1 they would double every normalised activation).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if key.endswith(MAMBA_PARAMS):  # Nemotron's Mamba-2 mixer: values of its own init, not N(0, s)
        return mamba_param(key, shape, gen).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith(".bias"):
        t.mul_(0.02)
    elif len(shape) == 1:  # RMSNorm / LayerNorm scales: near the centre, not on it, so swaps show up
        t.mul_(0.05).add_(norm_centre)
    else:  # matrices: a stable forward through 28 layers with residual connections
        t.mul_(0.02)
    return t.to(dtype)


def make_processor(min_pixels: int, max_pixels: int) -> Qwen2_5_VLProcessor:
    """The tiny processor with this script's pixel budget (make_tiny_processor's is 112x112)."""
    tokenizer = tiny.make_tiny_tokenizer()
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(size), **common),
        video_processor=Qwen2VLVideoProcessor(size=dict(size), cap_pixels_per_frame=True, **common),
        tokenizer=tokenizer, chat_template=tiny.CHAT_TEMPLATE,
    )


def make_gemma3_processor(config):
    """The tiny Gemma processor at the config's image size and soft tokens per image (896 px, 256
    for the real sizes), with pan-and-scan's crop minimum of the hub (256 px) when images are 896."""
    from transformers import Gemma3Processor

    side = config.vision_config.image_size
    base = tiny_gemma.make_tiny_gemma3_processor()
    image_processor = base.image_processor
    image_processor.size = {"height": side, "width": side}
    if side != tiny_gemma.IMAGE_SIZE:
        image_processor.pan_and_scan_min_crop_size = 256
    # image_seq_length is baked into the expanded image string at construction: build a new one.
    return Gemma3Processor(image_processor=image_processor, tokenizer=base.tokenizer,
                           chat_template=tiny_gemma.CHAT_TEMPLATE,
                           image_seq_length=config.mm_tokens_per_image)


def make_checkpoint(out: str | Path, size: str = "7b", dtype: str = "bf16", tie: bool = False,
                    seed: int = 0, overwrite: bool = False, max_shard_bytes: int = SHARD_BYTES,
                    max_pixels: int = MAX_PIXELS) -> dict:
    """Write the folder atomically (a crash leaves no half checkpoint); return a summary."""
    config = build_config(size, tie)
    config.dtype = DTYPES[dtype]
    specs = tensor_specs(config)
    gemma3, nemotron = is_gemma3(size), is_nemotron(size)
    constants = nemotron_constants(config) if nemotron else {}
    if nemotron:  # the omni model casts pixels to vision_config.dtype: keep the sub-configs in step
        config.text_config.dtype = config.vision_config.dtype = DTYPES[dtype]
    start = time.time()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for key, shape in specs:  # one tensor alive at a time, plus the writer's shard buffer
            if key in constants:
                writer.add(key, constants[key])
                continue
            centre = 0.0 if gemma3 and gemma_rms_norm(key, shape) else 1.0
            writer.add(key, random_tensor(key, shape, DTYPES[dtype], seed, centre))
        shards = len(set(writer.finalize().values()))
        config.save_pretrained(tmp)
        if nemotron:
            from vlm_bridge.testing import tiny_nemotron_vl as tiny_nemotron

            GenerationConfig(bos_token_id=tiny_nemotron.BOS_TOKEN_ID, pad_token_id=tiny_nemotron.PAD_TOKEN_ID,
                             eos_token_id=[tiny_nemotron.IM_END_ID, tiny_nemotron.EOS_TOKEN_ID],
                             do_sample=False).save_pretrained(tmp)
        elif gemma3:  # the hub's: stop on <eos> or <end_of_turn>
            GenerationConfig(bos_token_id=tiny_gemma.BOS_TOKEN_ID, pad_token_id=tiny_gemma.PAD_TOKEN_ID,
                             eos_token_id=[tiny_gemma.EOS_TOKEN_ID, tiny_gemma.END_OF_TURN_ID],
                             do_sample=False).save_pretrained(tmp)
        else:
            GenerationConfig(bos_token_id=tiny.ENDOFTEXT_ID, pad_token_id=tiny.ENDOFTEXT_ID,
                             eos_token_id=[tiny.IM_END_ID, tiny.ENDOFTEXT_ID],
                             do_sample=False).save_pretrained(tmp)
        if nemotron:
            processor = make_nemotron_processor()
            processor.tokenizer.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        elif gemma3:
            make_gemma3_processor(config).save_pretrained(tmp)
        elif size.startswith("qwen3"):
            from vlm_bridge.testing.tiny_qwen3_vl import make_tiny_qwen3_processor

            processor = make_tiny_qwen3_processor()
            for proc in (processor.image_processor, processor.video_processor):
                proc.size = {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}
            processor.save_pretrained(tmp)
        else:
            make_processor(MIN_PIXELS, max_pixels).save_pretrained(tmp)
    return {**summarize(specs, DTYPES[dtype]), "shards": shards, "seconds": time.time() - start}


def summarize(specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> dict:
    numel = [torch.Size(s).numel() for _, s in specs]
    parts = {"text": 0, "vision": 0, "lm_head": 0}
    for (key, _), n in zip(specs, numel):
        vision = key.startswith(("visual.", "model.visual.", "vision_tower.", "vision_model.",
                                 "multi_modal_projector."))
        lm_head = key in ("lm_head.weight", "language_model.lm_head.weight")
        parts["vision" if vision else "lm_head" if lm_head else "text"] += (
            n * dtype.itemsize)
    return {"tensors": len(specs), "params": sum(numel), "bytes": sum(numel) * dtype.itemsize,
            "gb": round(sum(numel) * dtype.itemsize / 1e9, 3), "bytes_by_part": parts}


def offline_and_quiet() -> None:
    """What every benchmark sets first: no hub access, no transformers chatter, no tqdm bars
    between the timings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("CI", "1")


def ensure_checkpoint(hf_dir: str | Path, size: str, dtype: str, **options) -> dict:
    """Write the random checkpoint unless ``hf_dir`` already holds one (its config.json is written
    last, inside an atomically renamed folder); ``{"make_checkpoint_s": ...}`` when written."""
    if (Path(hf_dir) / "config.json").is_file():
        return {}
    start = time.perf_counter()
    make_checkpoint(hf_dir, size, dtype, overwrite=True, **options)
    return {"make_checkpoint_s": time.perf_counter() - start}


def print_and_save(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b",
                   help="7b, qwen3_8b, qwen3_30b_a3b, qwen3_30b_a3b_<N>l (N LM layers), tiny, "
                        "gemma3_4b, gemma3_12b, gemma3_27b, gemma3_tiny, nemotron_12b, nemotron_tiny")
    p.add_argument("--out", help="output folder (required unless --dry-run)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--tie", action="store_true",
                   help="tie lm_head to the embedding (not 7B's; Gemma 3 is always tied, Nemotron never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="Qwen only (Gemma 3: 896x896; Nemotron: 1024-4096 patches of 16 px)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list tensors and bytes, write nothing")
    args = p.parse_args(argv)
    if args.out is None and not args.dry_run:
        p.error("--out is required")
    if args.dry_run:
        config = build_config(args.size, args.tie)
        print(json.dumps(summarize(tensor_specs(config), DTYPES[args.dtype])))
        return 0
    try:
        summary = make_checkpoint(args.out, args.size, args.dtype, args.tie, args.seed,
                                  args.overwrite, max_pixels=args.max_pixels)
    except CheckpointError as exc:  # e.g. --out exists without --overwrite
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
