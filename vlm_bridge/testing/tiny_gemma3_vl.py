"""Build a tiny but real Gemma 3 vision-language checkpoint folder, fully offline.

The Gemma 3 counterpart of :mod:`vlm_bridge.testing.tiny_qwen2_5_vl`: stock
``transformers`` (5.24) loads the folder through ``AutoModelForImageTextToText``
(``Gemma3ForConditionalGeneration``) and ``AutoProcessor`` (``Gemma3Processor`` with
the torchvision ``Gemma3ImageProcessor`` and a fast ``GemmaTokenizer``) exactly like
``google/gemma-3-4b-it``, yet a CPU forward takes a few milliseconds. Every Gemma 3
feature that a converter or a Megatron re-implementation can get wrong is kept, and
sized so that getting it wrong changes the logits:

* text: 6 layers ``[S, S, F, S, S, F]`` (S = sliding / local, F = full / global),
  written as explicit ``layer_types`` *and* the matching legacy
  ``sliding_window_pattern`` 3 (left out, the config would serialise the default 6,
  which contradicts ``layer_types``); ``sliding_window`` 16, far shorter than a prompt
  with two images (45 tokens), so the local layers really drop keys; GQA (4 query / 2 KV heads);
  ``head_dim`` 24 != hidden / heads = 16; ``query_pre_attn_scalar`` 20 != head_dim
  (scores are scaled by 20 ** -0.5, as gemma-3-27b's 168 != 128); per-head q/k
  RMSNorm; sandwich norms (pre and post attention, pre and post MLP); GeGLU with the
  tanh GELU; embeddings multiplied by sqrt(hidden) = 8.
* RoPE in the 5.24 form, one dict per layer type::

      rope_parameters = {
          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
          "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
      }

  Hub configs still write the legacy ``rope_theta`` (global base), ``rope_local_base_freq``
  (local base) and ``rope_scaling`` (which ``Gemma3TextConfig.convert_rope_params_to_dict``
  applies to ``full_attention`` only); the values here are those of gemma-3-4b-it.
* vocabulary: the Gemma control tokens at Gemma's own low ids (``<pad>`` 0, ``<eos>`` 1,
  ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4), the 256 ``<0xNN>`` byte-fallback pieces, a small
  trained BPE, then ``<start_of_image>`` / ``<end_of_image>`` / ``<image_soft_token>``
  as the last ids, like the real 255999 / 256000 / 262144. As in the real checkpoint
  the embedding table (``vocab_size`` 400) is *larger* than the tokenizer (389 ids):
  262208 rows vs 262145 tokens on the hub. 400 is not a multiple of 128 either.
* tied embeddings by default (Gemma 3 ships no ``lm_head``).
* softcapping: both ``final_logit_softcapping`` and ``attn_logit_softcapping`` are
  ``None``, as in every Gemma 3 hub config. In 5.24 they would be inert anyway:
  ``Gemma3ForConditionalGeneration.forward`` never applies the final softcap (only the
  text-only ``Gemma3ForCausalLM`` does), and ``Gemma3Attention`` stores
  ``attn_logit_softcapping`` but never passes ``softcap=`` to the attention function.
* vision: SigLIP (32 wide, 2 layers, 2 heads, MLP 48, no pooling head, like the hub's
  ``vision_use_head: false``) on 56x56 images with 14-px patches = 4x4 patches; the
  projector average-pools them with kernel 4 / sqrt(``mm_tokens_per_image`` = 4) = 2
  into 2x2 = 4 soft tokens (pooling really averages), RMS-normalises (1 + w) and
  multiplies by ``mm_input_projection_weight`` (stored [vision, text], *not* the
  ``nn.Linear`` [out, in] layout).

Weights are deterministic in the seed. On top of the shared perturbation of
:func:`vlm_bridge.testing.tiny_qwen2_5_vl.seeded_tiny_model` (random biases, norm
scales near 1), every Gemma RMSNorm weight is re-drawn around 0: Gemma scales by
``1 + w`` and initialises ``w = 0``, so zero-mean random ``w`` makes a converter that
forgets (or double-applies) the ``+ 1`` fail loudly. ``mm_input_projection_weight``
is initialised to zeros by transformers, which would make every image token a zero
vector; it is re-drawn as well.

Layout written by :func:`build_tiny_gemma3_vl` (transformers 5.24)::

    config.json                 Gemma3Config: text_config (gemma3_text), vision_config
                                (siglip_vision_model), mm_tokens_per_image, boi/eoi/image
                                token indices, eos [<eos>, <end_of_turn>]
    generation_config.json      greedy decoding, eos = <eos>, <end_of_turn>
    model.safetensors           as save_pretrained writes it: the legacy prefixes
                                language_model.model.*, vision_tower.*, multi_modal_projector.*,
                                language_model.lm_head.weight (only when untied)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    processor_config.json       Gemma3Processor (image_seq_length 4) + Gemma3ImageProcessor

In memory the same tensors are ``model.language_model.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*`` and ``lm_head.weight``. Hub files name the tower
``vision_tower.vision_model.*``: 5.24 strips ``vision_model.`` on load (the SigLIP
``PrefixChange`` in ``conversion_mapping.py``) and does not write it back, so readers of
raw safetensors must accept both spellings.

The processor turns each ``<start_of_image>`` of the template into ``"\n\n"``,
``<start_of_image>``, 4 ``<image_soft_token>``, ``<end_of_image>``, ``"\n\n"`` (8 ids;
``"\n\n"`` is one piece, as in the real vocabulary) and returns ``token_type_ids`` that
are 1 exactly on the soft tokens. The template starts with ``<bos>`` and the tokenizer
adds one too, so text rendered with ``tokenize=False`` must be encoded with
``add_special_tokens=False`` (``apply_chat_template(tokenize=True)`` does that itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GemmaTokenizer,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from vlm_bridge.testing.tiny_qwen2_5_vl import save_tiny_checkpoint, seeded_tiny_model

__all__ = [
    "BOI_TOKEN_ID",
    "CHAT_TEMPLATE",
    "EOI_TOKEN_ID",
    "IMAGE_TOKEN_ID",
    "MM_TOKENS_PER_IMAGE",
    "PAN_AND_SCAN_KWARGS",
    "SPECIAL_TOKEN_IDS",
    "TINY_VOCAB_SIZE",
    "TOKENIZER_SIZE",
    "build_tiny_gemma3_vl",
    "make_tiny_gemma3_model",
    "make_tiny_gemma3_processor",
    "make_tiny_gemma3_tokenizer",
    "tiny_gemma3_vl_config",
    "use_saved_pan_and_scan",
]

# --- tokenizer -----------------------------------------------------------------------------

# Gemma's control tokens keep their real ids (0-4); the two turn markers follow at once
# (the real 105 / 106 sit after ~100 unused tokens that would only bloat the table).
LEADING_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
)
# Gemma's SentencePiece vocabulary has byte-fallback pieces <0x00>..<0xFF>; GemmaTokenizer
# enables byte_fallback, so with them any text encodes without <unk>.
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))
# Pieces learned from the corpus below: its alphabet plus merges, deterministic.
NUM_LEARNED_TOKENS = 123
# The image tokens close the vocabulary, as on the hub (255999, 256000, then 262144).
TRAILING_SPECIAL_TOKENS: tuple[str, ...] = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")

_FIRST_TRAILING_ID = len(LEADING_SPECIAL_TOKENS) + len(BYTE_TOKENS) + NUM_LEARNED_TOKENS
SPECIAL_TOKEN_IDS: dict[str, int] = {
    **{tok: i for i, tok in enumerate(LEADING_SPECIAL_TOKENS)},
    **{tok: _FIRST_TRAILING_ID + i for i, tok in enumerate(TRAILING_SPECIAL_TOKENS)},
}
TOKENIZER_SIZE = _FIRST_TRAILING_ID + len(TRAILING_SPECIAL_TOKENS)  # 389
# Embedding rows beyond the tokenizer, like the hub's 262208 rows for 262145 tokens; not a
# multiple of 128, so vocab-padding code paths run.
TINY_VOCAB_SIZE = 400

PAD_TOKEN_ID = SPECIAL_TOKEN_IDS["<pad>"]
EOS_TOKEN_ID = SPECIAL_TOKEN_IDS["<eos>"]
BOS_TOKEN_ID = SPECIAL_TOKEN_IDS["<bos>"]
START_OF_TURN_ID = SPECIAL_TOKEN_IDS["<start_of_turn>"]
END_OF_TURN_ID = SPECIAL_TOKEN_IDS["<end_of_turn>"]
BOI_TOKEN_ID = SPECIAL_TOKEN_IDS["<start_of_image>"]
EOI_TOKEN_ID = SPECIAL_TOKEN_IDS["<end_of_image>"]
IMAGE_TOKEN_ID = SPECIAL_TOKEN_IDS["<image_soft_token>"]

# Small built-in corpus: the merges only need to be stable, and training on the test
# phrases keeps the prompts short. It has newlines because the chat template and the image
# expansion use "\n" and "\n\n", single pieces (107, 108) in the real vocabulary: they are
# pieces here too, not byte fallbacks.
_TRAINING_CORPUS: tuple[str, ...] = (
    "user\nYou are a helpful assistant.\n\nDescribe the image.\n\n",
    "model\nThe image shows shapes.\n\n\n\nuser\n\n\nmodel\n",
    "You are a helpful assistant.",
    "Describe the image in one sentence.",
    "The image shows a red square and a blue circle on a green background.",
    "Compare the two pictures and tell me which one is larger.",
    "Write a short poem about shapes, colours and motion.",
    "Here is the original image and here are some crops to help you see better",
    "The quick brown fox jumps over the lazy dog. 0123456789",
)

# google/gemma-3-4b-it's chat template (also the -12b/-27b one): <bos>, a system message
# folded into the first user turn followed by a blank line, "assistant" renamed "model",
# strictly alternating roles, text items trimmed, every image item rendered as a bare
# <start_of_image> (the processor expands it), and "<start_of_turn>model\n" as the
# generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# --- model dimensions ----------------------------------------------------------------------

TEXT_HIDDEN_SIZE = 64
TEXT_NUM_HEADS = 4
TEXT_NUM_KV_HEADS = 2
# Deliberately != hidden / heads (16): q/k/v/o shapes then expose a converter that derives
# head_dim from the hidden size.
TEXT_HEAD_DIM = 24
# Deliberately != head_dim: attention scores are scaled by query_pre_attn_scalar ** -0.5.
QUERY_PRE_ATTN_SCALAR = 20
SLIDING_WINDOW = 16
# Period 3: two local layers then a global one, twice, so both kinds occur more than once
# and the model ends on a global layer. (The real period is 6.)
SLIDING_WINDOW_PATTERN = 3
NUM_TEXT_LAYERS = 6
LAYER_TYPES: list[str] = [
    "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
    for i in range(NUM_TEXT_LAYERS)
]
LOCAL_ROPE_THETA = 10_000.0
GLOBAL_ROPE_THETA = 1_000_000.0
GLOBAL_ROPE_SCALING_FACTOR = 8.0
ROPE_PARAMETERS: dict[str, dict[str, Any]] = {
    "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_ROPE_THETA},
    "full_attention": {
        "rope_type": "linear",
        "factor": GLOBAL_ROPE_SCALING_FACTOR,
        "rope_theta": GLOBAL_ROPE_THETA,
    },
}
MAX_POSITION_EMBEDDINGS = 4096

TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN_SIZE,
    # Not a multiple of hidden: a transposed MLP weight cannot pass a shape check.
    "intermediate_size": 96,
    "num_hidden_layers": NUM_TEXT_LAYERS,
    "num_attention_heads": TEXT_NUM_HEADS,
    "num_key_value_heads": TEXT_NUM_KV_HEADS,
    "head_dim": TEXT_HEAD_DIM,
    "query_pre_attn_scalar": QUERY_PRE_ATTN_SCALAR,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "sliding_window": SLIDING_WINDOW,
    "layer_types": LAYER_TYPES,
    # Legacy field, kept consistent with layer_types (see the module docstring).
    "sliding_window_pattern": SLIDING_WINDOW_PATTERN,
    "rope_parameters": ROPE_PARAMETERS,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
    "pad_token_id": PAD_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
}

PATCH_SIZE = 14
IMAGE_SIZE = 56  # 4x4 patches
# sqrt(4) = 2 tokens per side, so the projector's AvgPool2d kernel is 4 // 2 = 2.
MM_TOKENS_PER_IMAGE = 4

TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    # Gemma 3 uses the patch sequence, not SigLIP's attention-pooling head (hub: false).
    "vision_use_head": False,
}

# --- processor -----------------------------------------------------------------------------

# Gemma 3 normalises to [-1, 1] (mean = std = 0.5) after a bilinear resize to a square.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]
# Pan-and-scan: crops must be at least one model image (56 px) wide, so a 168x56 image
# (aspect 3) gives 3 crops of 56x56; the real minimum is 256 px for 896 px inputs.
PAN_AND_SCAN_KWARGS: dict[str, Any] = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 56,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
_PAN_AND_SCAN_KEYS = tuple(PAN_AND_SCAN_KWARGS)


def tiny_gemma3_vl_config(tie_word_embeddings: bool = True, **overrides: Any) -> Gemma3Config:
    """Return the tiny Gemma 3 config, optionally with overrides.

    ``text_config`` / ``vision_config`` overrides are dicts merged into the tiny
    defaults (so ``text_config={"sliding_window": 8}`` changes only that field); any
    other keyword is a top-level ``Gemma3Config`` field. Special-token ids always
    match :func:`make_tiny_gemma3_tokenizer`.
    """
    text_config = {
        **TINY_TEXT_CONFIG,
        # Deep-copied so a caller mutating the config cannot edit the module constants.
        "layer_types": list(LAYER_TYPES),
        "rope_parameters": {kind: dict(params) for kind, params in ROPE_PARAMETERS.items()},
        # Keep the text flag in step with the top-level one (the one PreTrainedModel reads).
        "tie_word_embeddings": tie_word_embeddings,
        **overrides.pop("text_config", {}),
    }
    vision_config = {**TINY_VISION_CONFIG, **overrides.pop("vision_config", {})}
    top_level: dict[str, Any] = {
        "mm_tokens_per_image": MM_TOKENS_PER_IMAGE,
        "boi_token_index": BOI_TOKEN_ID,
        "eoi_token_index": EOI_TOKEN_ID,
        "image_token_index": IMAGE_TOKEN_ID,
        # The hub config stops on either <eos> or <end_of_turn>.
        "eos_token_id": [EOS_TOKEN_ID, END_OF_TURN_ID],
        "tie_word_embeddings": tie_word_embeddings,
        **overrides,
    }
    return Gemma3Config(text_config=text_config, vision_config=vision_config, **top_level)


def _train_learned_pieces() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the in-memory BPE; return its vocabulary (piece -> trainer id) and merges.

    Training splits on spaces the SentencePiece way ("▁" glued to the next word) so
    the pieces look like Gemma's; the trainer is deterministic for a fixed corpus.
    """
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # Newline runs are their own words, so no piece glues a newline to a letter ("model\n"),
    # which SentencePiece's Gemma vocabulary would not do either.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_LEARNED_TOKENS, min_frequency=1, show_progress=False, special_tokens=[]
    )
    tokenizer.train_from_iterator(list(_TRAINING_CORPUS), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    if len(vocab) != NUM_LEARNED_TOKENS:
        raise RuntimeError(f"BPE training produced {len(vocab)} pieces, expected {NUM_LEARNED_TOKENS}")
    return vocab, [tuple(merge) for merge in model["merges"]]


def make_tiny_gemma3_tokenizer() -> GemmaTokenizer:
    """The tiny ``GemmaTokenizer`` (tokenizers backend, byte fallback), built in memory.

    Special ids are in :data:`SPECIAL_TOKEN_IDS`; bos ``<bos>`` is prepended by default
    (``add_bos_token``, as on the hub), eos is ``<eos>``, pad ``<pad>``. The image tokens
    are registered as the named extra special tokens ``boi_token`` / ``eoi_token`` /
    ``image_token`` that ``Gemma3Processor`` reads.
    """
    learned, merges = _train_learned_pieces()
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(LEADING_SPECIAL_TOKENS)}
    vocab.update({tok: len(LEADING_SPECIAL_TOKENS) + i for i, tok in enumerate(BYTE_TOKENS)})
    offset = len(vocab)
    for piece, trainer_id in sorted(learned.items(), key=lambda item: item[1]):
        vocab[piece] = offset + trainer_id
    vocab.update({tok: SPECIAL_TOKEN_IDS[tok] for tok in TRAILING_SPECIAL_TOKENS})
    added_tokens = {
        idx: AddedToken(tok, special=True, normalized=False) for tok, idx in SPECIAL_TOKEN_IDS.items()
    }
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        added_tokens_decoder=added_tokens,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        chat_template=CHAT_TEMPLATE,
    )
    actual = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKEN_IDS}
    if actual != SPECIAL_TOKEN_IDS or len(tokenizer) != TOKENIZER_SIZE:
        raise RuntimeError(f"tiny tokenizer ids {actual} (size {len(tokenizer)}) != {SPECIAL_TOKEN_IDS}")
    return tokenizer


def use_saved_pan_and_scan(processor: Gemma3Processor) -> Gemma3Processor:
    """Make ``processor`` follow its image processor's own pan-and-scan settings; return it.

    In transformers 5.24 ``Gemma3Processor.images_kwargs`` (a class attribute: pan-and-scan
    off, min crop 256, ...) is merged into every call *above* the image processor's saved
    attributes, so a ``preprocessor`` config with ``do_pan_and_scan: true`` is silently
    ignored, and ``processor_config.json`` has no field that could override it. Setting the
    instance attribute is the one non-call-site knob; explicit call kwargs still win. Apply
    it after ``AutoProcessor.from_pretrained`` on a folder built with ``pan_and_scan=True``
    (or pass :data:`PAN_AND_SCAN_KWARGS` to each call).
    """
    saved = {key: getattr(processor.image_processor, key, None) for key in _PAN_AND_SCAN_KEYS}
    processor.images_kwargs = {
        **type(processor).images_kwargs,
        **{key: value for key, value in saved.items() if value is not None},
    }
    return processor


def make_tiny_gemma3_processor(
    pan_and_scan: bool = False, tokenizer: GemmaTokenizer | None = None
) -> Gemma3Processor:
    """Build the Gemma 3 processor: 56x56 images, 4 soft tokens each.

    ``pan_and_scan=True`` turns on pan-and-scan with crops as small as one model image,
    so a 168x56 image becomes its 56x56 thumbnail plus 3 crops (4 ``pixel_values``
    entries, 4 image blocks in the prompt). The image processor stores the setting (it is
    what ``save_pretrained`` writes); see :func:`use_saved_pan_and_scan` for why the
    processor needs telling as well.
    """
    tokenizer = tokenizer if tokenizer is not None else make_tiny_gemma3_tokenizer()
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        **{**PAN_AND_SCAN_KWARGS, "do_pan_and_scan": pan_and_scan},
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    return use_saved_pan_and_scan(processor) if pan_and_scan else processor


def _randomise_gemma_parameters(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Re-draw the parameters whose stock init would hide conversion mistakes.

    Gemma RMSNorm weights become zero-mean (scale ``1 + w``) instead of the shared
    helper's ``1 + noise`` (which would mean scale ~2 everywhere), the zero-initialised
    projector matrix gets a fan-in-scaled normal so image tokens carry signal, and the
    ``<pad>`` embedding row (zeroed because it is ``padding_idx``) gets values like the
    other rows, so with tied embeddings the ``<pad>`` logit is not a constant 0.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Gemma3RMSNorm):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=generator) * proj.shape[0] ** -0.5)
        embeddings = model.get_input_embeddings().weight
        std = model.config.text_config.initializer_range
        embeddings[PAD_TOKEN_ID].copy_(torch.randn(embeddings.shape[1], generator=generator) * std)


def make_tiny_gemma3_model(
    config: Gemma3Config, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Gemma3ForConditionalGeneration:
    """The tiny Gemma 3 with seeded weights (see the module docstring)."""
    model = seeded_tiny_model(
        Gemma3ForConditionalGeneration, config, seed, dtype, extra_init=_randomise_gemma_parameters
    )
    # seeded_tiny_model writes Qwen's ids; Gemma 3 stops on <eos> or <end_of_turn>.
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=[EOS_TOKEN_ID, END_OF_TURN_ID],
        do_sample=False,
    )
    return model


def build_tiny_gemma3_vl(
    out_dir: str | Path,
    *,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    pan_and_scan: bool = False,
) -> Path:
    """Write a complete tiny Gemma 3 checkpoint folder and return its path.

    The folder loads offline with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``. Weights are deterministic in ``seed``;
    ``max_shard_size`` (e.g. ``"100KB"``) forces a sharded checkpoint with an index;
    ``pan_and_scan`` saves an image processor with pan-and-scan switched on, which a
    processor loaded from the folder only honours after :func:`use_saved_pan_and_scan`
    (or with :data:`PAN_AND_SCAN_KWARGS` passed to each call).
    """
    config = tiny_gemma3_vl_config(tie_word_embeddings=tie_word_embeddings)
    model = make_tiny_gemma3_model(config, seed=seed, dtype=dtype)
    processor = make_tiny_gemma3_processor(pan_and_scan=pan_and_scan)
    return save_tiny_checkpoint(out_dir, model, processor, max_shard_size)
