"""Write a random-weight Qwen2.5-VL HF folder at real 7B dimensions, streaming, for benchmarks.

The 7B checkpoint (~16.6 GB in bf16) is never held in memory: the HF model is built on the
``meta`` device only to enumerate parameter names and shapes, and each tensor is generated from
its own seed and streamed into 5 GB safetensors shards. Peak memory is one shard buffer plus the
largest tensor (the 152064 x 3584 embedding) in fp32.

Tokenizer and processor are the tiny ones from :mod:`vlm_bridge.testing.tiny_qwen2_5_vl` (no
network); the config's special-token ids are set to the tiny tokenizer's ids, while the vocab stays
152064, so ids above the tokenizer's 300 are simply never produced.

    python benchmarks/make_checkpoint.py --size 7b --out /data/qwen7b-random [--dtype bf16] [--tie]
    python benchmarks/make_checkpoint.py --size 7b --dry-run   # tensor count and bytes only
"""

from __future__ import annotations

import argparse
import json
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


def build_config(size: str, tie: bool):
    if size == "qwen3_8b":
        return qwen3_8b_config(tie)
    if size.startswith("qwen3_30b_a3b"):  # qwen3_30b_a3b or qwen3_30b_a3b_<layers>l
        layers = int(size.rsplit("_", 1)[1][:-1]) if size.endswith("l") else 48
        return qwen3_30b_a3b_config(tie, layers)
    return qwen7b_config(tie) if size == "7b" else tiny.tiny_qwen2_5_vl_config(tie_word_embeddings=tie)


def hub_key(name: str) -> str:
    """transformers 5 in-memory parameter name -> the hub's on-disk key (Qwen2.5-VL only;
    Qwen3-VL keeps its in-memory names on disk)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    return name


def tensor_specs(config: Qwen2_5_VLConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(hub key, shape) of every saved tensor, from a meta-device model (allocates nothing)."""
    from transformers import AutoModelForImageTextToText

    qwen3 = config.model_type in ("qwen3_vl", "qwen3_vl_moe")
    with torch.device("meta"):
        model = (AutoModelForImageTextToText.from_config(config) if qwen3
                 else Qwen2_5_VLForConditionalGeneration(config))
    rename = (lambda n: n) if qwen3 else hub_key
    specs = [(rename(n), tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)]
    if config.tie_word_embeddings:  # HF does not save the tied output layer
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    return sorted(specs)


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic per key: a tensor's values do not depend on which others are written."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith(".bias"):
        t.mul_(0.02)
    elif len(shape) == 1:  # RMSNorm / LayerNorm scales: around 1, not exactly 1, so swaps show up
        t.mul_(0.05).add_(1.0)
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


def make_checkpoint(out: str | Path, size: str = "7b", dtype: str = "bf16", tie: bool = False,
                    seed: int = 0, overwrite: bool = False, max_shard_bytes: int = SHARD_BYTES,
                    max_pixels: int = MAX_PIXELS) -> dict:
    """Write the folder atomically (a crash leaves no half checkpoint); return a summary."""
    config = build_config(size, tie)
    config.dtype = DTYPES[dtype]
    specs = tensor_specs(config)
    start = time.time()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for key, shape in specs:  # one tensor alive at a time, plus the writer's shard buffer
            writer.add(key, random_tensor(key, shape, DTYPES[dtype], seed))
        shards = len(set(writer.finalize().values()))
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tiny.ENDOFTEXT_ID, pad_token_id=tiny.ENDOFTEXT_ID,
                         eos_token_id=[tiny.IM_END_ID, tiny.ENDOFTEXT_ID],
                         do_sample=False).save_pretrained(tmp)
        if size.startswith("qwen3"):
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
        vision = key.startswith(("visual.", "model.visual."))
        parts["vision" if vision else "lm_head" if key == "lm_head.weight" else "text"] += (
            n * dtype.itemsize)
    return {"tensors": len(specs), "params": sum(numel), "bytes": sum(numel) * dtype.itemsize,
            "gb": round(sum(numel) * dtype.itemsize / 1e9, 3), "bytes_by_part": parts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="7b",
                   help="7b, qwen3_8b, qwen3_30b_a3b, qwen3_30b_a3b_<N>l (N LM layers), tiny")
    p.add_argument("--out", help="output folder (required unless --dry-run)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--tie", action="store_true", help="tie lm_head to the embedding (not 7B's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
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
