"""Build a tiny but real Qwen2.5-VL checkpoint folder, fully offline.

Conversion and parity tests need a checkpoint that stock ``transformers`` loads
exactly like a hub one (same config schema, same safetensors key layout, same
processor and chat template), yet is small enough for a CPU forward in well
under a second and can be produced without network access. Every dimension is
shrunk, but each architectural feature is kept: GQA, M-RoPE with a non-trivial
``mrope_section``, biased q/k/v, a vocabulary that is *not* a multiple of 128
(so vocab-padding code paths run), windowed vision attention that really splits
images into several (partly padded) windows, full-attention vision blocks,
spatial patch merging and temporal patches.

Layout written by :func:`build_tiny_qwen2_5_vl` (transformers 5.24)::

    config.json                 nested text_config / vision_config; rope_parameters
                                (rope_theta, mrope_section) live in text_config
    generation_config.json      greedy decoding, eos = <|im_end|>, <|endoftext|>
    model.safetensors           hub key layout: model.embed_tokens, model.layers.*,
                                model.norm, visual.*, lm_head (absent when tied)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    processor_config.json       Qwen2_5_VLProcessor with image and video processors
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    BatchFeature,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

# --- tokenizer -----------------------------------------------------------------------------

# Qwen2's own pre-tokenizer split (digits one by one, letters in runs, ...); copied so the
# tiny tokenizer segments text the same way Qwen2Tokenizer rebuilds it on load.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# 256 byte-level symbols + 36 learned merges: byte-level BPE can encode any text, and the
# total (with the 8 special tokens) is 300, deliberately not a multiple of 128.
NUM_BASE_TOKENS = 292

# Same relative order as the real Qwen2.5-VL vocabulary (151643, 151644, 151645, 151652...),
# minus the object_ref/box/quad tokens that the model never needs.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKEN_IDS: dict[str, int] = {
    tok: NUM_BASE_TOKENS + i for i, tok in enumerate(SPECIAL_TOKENS)
}
TINY_VOCAB_SIZE = NUM_BASE_TOKENS + len(SPECIAL_TOKENS)  # 300

ENDOFTEXT_ID = SPECIAL_TOKEN_IDS["<|endoftext|>"]
IM_END_ID = SPECIAL_TOKEN_IDS["<|im_end|>"]
VISION_START_ID = SPECIAL_TOKEN_IDS["<|vision_start|>"]
VISION_END_ID = SPECIAL_TOKEN_IDS["<|vision_end|>"]
IMAGE_TOKEN_ID = SPECIAL_TOKEN_IDS["<|image_pad|>"]
VIDEO_TOKEN_ID = SPECIAL_TOKEN_IDS["<|video_pad|>"]

# Small built-in corpus: the BPE merges only need to be stable, not good, and training on
# the chat-template phrases keeps the prompts used by tests reasonably short.
_TRAINING_CORPUS: tuple[str, ...] = (
    "system\nYou are a helpful assistant.",
    "user\nDescribe the image in one sentence.",
    "assistant\nThe image shows a red square and a blue circle on a green background.",
    "What happens in this video? A square moves from the top left to the bottom right.",
    "Compare the two pictures and tell me which one is larger.",
    "Write a short poem about shapes, colours and motion.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
)

# Qwen2-VL / Qwen2.5-VL ChatML template: a default system turn, <|vision_start|><|image_pad|>
# <|vision_end|> per image item, the same with <|video_pad|> per video item, optional
# "Picture N:"/"Video N:" labels (add_vision_id) and the assistant generation prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
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
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --- model dimensions ----------------------------------------------------------------------

TEXT_HIDDEN_SIZE = 64
TEXT_NUM_HEADS = 4
TEXT_HEAD_DIM = TEXT_HIDDEN_SIZE // TEXT_NUM_HEADS  # 16
# Sums to head_dim / 2 = 8 rotary frequencies, split unevenly over (t, h, w) like the real
# [16, 24, 24] so a mis-split shows up.
MROPE_SECTION = [2, 3, 3]
MAX_POSITION_EMBEDDINGS = 4096

TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN_SIZE,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": TEXT_NUM_HEADS,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "max_window_layers": 4,
    "attention_dropout": 0.0,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": MROPE_SECTION,
    },
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
}

PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# 56 px = 2x2 merged units per window: a 56x84 or 112x56 image spans two windows, one of
# them padded, so window partitioning and its reordering are both exercised.
WINDOW_SIZE = 56

TINY_VISION_CONFIG: dict[str, Any] = {
    "depth": 4,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "silu",
    "out_hidden_size": TEXT_HIDDEN_SIZE,
    "in_channels": 3,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": SPATIAL_MERGE_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "window_size": WINDOW_SIZE,
    "fullatt_block_indexes": [1, 3],
    "tokens_per_second": 2,
}

# --- processor sizes ---------------------------------------------------------------------

# Pixel budgets: at least 2x2 merged units (56x56 px), at most 4x4 (112x112 px). The test
# images (56x84, 112x56) and video frames (56x56) are already multiples of 28 inside this
# range, so they are not resized and the token counts are easy to predict.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
# Frame rate assumed for in-memory clips; with temporal_patch_size 2 it gives
# second_per_grid_ts = 1.0, i.e. tokens_per_second (2) temporal positions per grid step.
VIDEO_FPS = 2.0

PROMPT_IMAGES = "Compare the two pictures."
PROMPT_VIDEO = "What happens in this video?"
PROMPT_TEXT = "Write a short poem about shapes."


def tiny_qwen2_5_vl_config(tie_word_embeddings: bool = False, **overrides: Any) -> Qwen2_5_VLConfig:
    """Return the tiny Qwen2.5-VL config, optionally with overrides.

    ``text_config`` / ``vision_config`` overrides are dicts merged into the tiny
    defaults (so ``text_config={"num_hidden_layers": 2}`` changes only that
    field); any other keyword is a top-level ``Qwen2_5_VLConfig`` field. The
    special-token ids always match :func:`make_tiny_tokenizer`.
    """
    text_config = {**TINY_TEXT_CONFIG, **overrides.pop("text_config", {})}
    vision_config = {**TINY_VISION_CONFIG, **overrides.pop("vision_config", {})}
    top_level: dict[str, Any] = {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "tie_word_embeddings": tie_word_embeddings,
        **overrides,
    }
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **top_level)


def _train_byte_level_bpe() -> Tokenizer:
    """Train the base BPE in memory; the trainer is deterministic for a fixed corpus."""
    tokenizer = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_BASE_TOKENS,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(list(_TRAINING_CORPUS), trainer=trainer)
    return tokenizer


def _check_special_token_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    """Fail loudly if the tokenizer's ids drifted from the ids baked into the config."""
    actual = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    if actual != SPECIAL_TOKEN_IDS or len(tokenizer) != TINY_VOCAB_SIZE:
        raise RuntimeError(
            f"tiny tokenizer ids {actual} (size {len(tokenizer)}) != {SPECIAL_TOKEN_IDS}"
        )


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE ``Qwen2Tokenizer``, built in memory.

    It is the real tokenizer class with Qwen2's pre-tokenizer, the Qwen2.5-VL special tokens (ids
    in :data:`SPECIAL_TOKEN_IDS`), eos ``<|im_end|>``, pad ``<|endoftext|>`` and the Qwen2.5-VL
    chat template, so text-only code can use ``AutoTokenizer`` on a saved folder exactly as on a
    hub checkpoint.
    """
    model = json.loads(_train_byte_level_bpe().to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    if len(vocab) != NUM_BASE_TOKENS:
        raise RuntimeError(f"BPE training produced {len(vocab)} tokens, expected {NUM_BASE_TOKENS}")
    merges = [tuple(merge) for merge in model["merges"]]
    # Passing the special tokens with explicit ids pins them after the base vocab in order.
    added_tokens = {
        SPECIAL_TOKEN_IDS[tok]: AddedToken(tok, special=True, normalized=False)
        for tok in SPECIAL_TOKENS
    }
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder=added_tokens,
        extra_special_tokens=[tok for tok in SPECIAL_TOKENS if tok != "<|endoftext|>"],
        model_max_length=MAX_POSITION_EMBEDDINGS,
        chat_template=CHAT_TEMPLATE,
    )
    _check_special_token_ids(tokenizer)
    return tokenizer


def make_tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> Qwen2_5_VLProcessor:
    """Build the Qwen2.5-VL processor with pixel budgets small enough for the tiny tests."""
    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common = {
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": SPATIAL_MERGE_SIZE,
    }
    image_processor = Qwen2VLImageProcessor(size=dict(size), **common)
    # cap_pixels_per_frame=True is the reference (qwen-vl-utils) behaviour and silences the
    # v5 deprecation warning; for clips this small it changes nothing.
    video_processor = Qwen2VLVideoProcessor(size=dict(size), cap_pixels_per_frame=True, **common)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _perturb_identity_parameters(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Randomise biases and norm scales, which default to exactly 0 and 1.

    With the stock init a converter that drops a bias or swaps two norm weights
    would still match the reference bit for bit; perturbing them makes such
    mistakes visible in parity tests.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif param.ndim == 1 and ("norm" in name or "ln_q" in name):
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)


def seeded_tiny_model(
    model_cls: type[PreTrainedModel], config, seed: int = 0, dtype: torch.dtype = torch.float32,
    extra_init: Callable[[PreTrainedModel, torch.Generator], None] | None = None,
) -> PreTrainedModel:
    """Instantiate ``model_cls(config)`` with weights seeded by ``seed`` (biases and norm scales
    perturbed, then ``extra_init``) without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    generator = torch.Generator().manual_seed(seed + 1)
    _perturb_identity_parameters(model, generator)
    if extra_init is not None:
        extra_init(model, generator)
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        do_sample=False,
    )
    return model.to(dtype).eval()


def save_tiny_checkpoint(
    out_dir: str | Path, model: PreTrainedModel, processor, max_shard_size: str | None = None
) -> Path:
    """Write model, tokenizer and processor into ``out_dir`` (sharded when ``max_shard_size``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out_dir), **save_kwargs)
    processor.tokenizer.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_model(
    config: Qwen2_5_VLConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Qwen2_5_VLForConditionalGeneration:
    """The tiny Qwen2.5-VL with seeded weights (see :func:`seeded_tiny_model`)."""
    return seeded_tiny_model(Qwen2_5_VLForConditionalGeneration, config, seed, dtype)


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a complete tiny Qwen2.5-VL checkpoint folder and return its path.

    The folder loads offline with ``Qwen2_5_VLForConditionalGeneration.from_pretrained``
    and ``AutoProcessor.from_pretrained``. Weights are deterministic in ``seed``;
    ``max_shard_size`` (e.g. ``"100KB"``) forces a sharded checkpoint with an
    index file, to test loaders on multi-file checkpoints. ``config_overrides`` go to
    :func:`tiny_qwen2_5_vl_config` (e.g. ``{"vision_config": {"intermediate_size": 70}}``).
    """
    config = tiny_qwen2_5_vl_config(tie_word_embeddings=tie_word_embeddings, **(config_overrides or {}))
    model = make_tiny_model(config, seed=seed, dtype=dtype)
    return save_tiny_checkpoint(out_dir, model, make_tiny_processor(), max_shard_size)


def _user_turn(items: list[dict[str, str]], prompt: str) -> list[dict[str, Any]]:
    """One-user-message conversation: media placeholders first, then the question."""
    return [{"role": "user", "content": [*items, {"type": "text", "text": prompt}]}]


def build_inputs(
    processor: Qwen2_5_VLProcessor,
    *,
    images: Sequence[Image.Image],
    video: Sequence[Image.Image] | None,
    text_only_row: bool,
    padding_side: Literal["left", "right"] = "left",
) -> BatchFeature:
    """Build a padded multi-row batch through the chat template and the processor.

    Rows, in order and only when their media is given: all ``images`` in one row
    (so one row holds several images of different sizes), the ``video`` (a list
    of PIL frames, taken at :data:`VIDEO_FPS`) in the next, then a text-only
    row. Padding defaults to the left, as HF ``generate`` requires for batches.
    The result holds ``input_ids``, ``attention_mask``, ``mm_token_type_ids``
    and, when present, ``pixel_values``/``image_grid_thw`` and
    ``pixel_values_videos``/``video_grid_thw``/``second_per_grid_ts``.
    """
    conversations = []
    if images:
        conversations.append(_user_turn([{"type": "image"}] * len(images), PROMPT_IMAGES))
    if video is not None:
        conversations.append(_user_turn([{"type": "video"}], PROMPT_VIDEO))
    if text_only_row:
        conversations.append(_user_turn([], PROMPT_TEXT))
    if not conversations:
        raise ValueError("build_inputs needs at least one of images, video or text_only_row")
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    media: dict[str, Any] = {}
    if images:
        media["images"] = list(images)
    if video is not None:
        media["videos"] = [list(video)]
        media["video_metadata"] = [{"total_num_frames": len(video), "fps": VIDEO_FPS}]
    return processor(
        text=texts, padding=True, padding_side=padding_side, return_tensors="pt", **media
    )
