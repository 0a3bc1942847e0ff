"""Build a tiny but real Nemotron-H Omni (Nemotron 3 Nano Omni) checkpoint folder, fully offline.

The Nemotron counterpart of :mod:`vlm_bridge.testing.tiny_qwen2_5_vl` and
:mod:`vlm_bridge.testing.tiny_gemma3_vl`: stock ``transformers`` (5.24) loads the folder
through ``AutoModelForImageTextToText`` (``NemotronH_Omni_Reasoning_V3``, model_type
``nemotron_h_omni``) and ``AutoProcessor`` (``NemotronH_Omni_Reasoning_V3Processor``)
like ``nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16``, yet a CPU forward takes
milliseconds. Every feature that a converter or a Megatron re-implementation can get
wrong is kept, and sized so that getting it wrong changes the logits:

* text (``nemotron_h``): 8 hybrid layers ``M-M*-M*-`` (M = Mamba-2 mixer, ``*`` =
  attention, ``-`` = dense MLP), stored as 5.24's ``layers_block_type`` list
  (``linear_attention`` / ``full_attention`` / ``mlp``; the hub's legacy
  ``hybrid_override_pattern`` string is converted on load and is still readable as a
  property). Hidden 64, RMSNorm eps 1e-5 (``layer_norm_epsilon``), one pre-norm per
  block, final ``norm_f``, untied ``lm_head``.

  - Mamba-2: 8 heads x head_dim 8 (``d_inner = mamba_num_heads * mamba_head_dim = 64``;
    5.24 ignores ``expand``, which stays 2 so that a converter computing
    ``expand * hidden = 128`` fails, as it would on the hub where the two disagree too),
    ``n_groups`` 2 (grouped B/C *and* a group-wise gated RMSNorm of group size 32),
    ``ssm_state_size`` 16, ``conv_kernel`` 4 (with bias), ``chunk_size`` 8, shorter than
    every image prompt, so the chunked scan carries state across chunks.
    ``time_step_min`` 0.05 is the lower clamp of ``dt = softplus(x + dt_bias)`` (5.24
    uses ``time_step_limit = (time_step_min, inf)`` in the forward, whatever the config's
    ``time_step_limit`` says); half of every layer's heads get a ``dt_bias`` near -7
    (dt ~ 0.001), so about half of all dt values are really clamped, ~50x up.
  - attention: 4 query / 2 KV heads, head_dim 16, no bias and *no positional encoding*
    (Nemotron-H attention has no RoPE; order comes from the Mamba layers).
  - MLP: ``up_proj`` -> squared ReLU (``relu2``) -> ``down_proj``, no gate, 96 wide.
  - ``moe=True`` turns every MLP into a routed MoE layer (``M E M * E M * E``):
    4 non-gated relu2 experts, top-2 sigmoid routing with a (randomised)
    ``e_score_correction_bias``, ``routed_scaling_factor`` 2.5, one shared expert.

* vision (``radio``, C-RADIO): patch 16, hidden 32, 2 layers, 2 heads, MLP 64
  (``mlp_ratio`` 2, GELU), LayerNorm pre-norms, fused-in-the-hub ``qkv`` with bias.
  ``max_img_size`` 128 gives an 8x8 CPE position table: a 4x6 patch grid is an
  interpolation to 6x6 then a crop, a 10x4 grid an up-sampling to 10x10 then a crop,
  so a converter that crops where it should interpolate (or the reverse) fails. The
  position table and the 2 cls + 3 register tokens are re-drawn with std 0.5 (their
  init, 0.02, would make them nearly invisible). ``video_temporal_patch_size`` 2 adds a
  separate ``video_patch_projection`` (2 frames x 3 channels x 16 x 16 -> 32).
  The omni model calls ``make_preprocessor_external()``: the input conditioner
  (mean/std buffers) is an ``nn.Identity``, has no weights, and the image/video
  processors normalise instead (CLIP mean/std, as on the hub). C-RADIO has no
  LayerScale: transformers' inherited ``layer_scale{1,2}.lambda1`` (all 1.0) are not
  written in the default (hub) format, as on the hub (the class lists them in
  ``_keys_to_ignore_on_load_missing``), and are written by the native format.
* projector: 2x2 pixel shuffle (``downsample_ratio`` 0.5: 32 -> 128 channels),
  RMSNorm(128) -> Linear(128, 48) -> relu2 -> Linear(48, 64), no biases
  (``vision_hidden_size`` 32, ``projector_hidden_size`` 48). ``vision_final_layernorm=True``
  sets ``text_config.num_nextn_predict_layers`` to 1, which is how 5.24 decides to
  build the LayerNorm that Megatron-Core puts after the vision tower of MTP models.
* no audio (``audio_config`` None); the processor still needs its
  ``ParakeetFeatureExtractor`` (5.24 refuses ``None``), which is saved but unused.

Weights are deterministic in the seed. On top of the shared perturbation of
:func:`vlm_bridge.testing.tiny_qwen2_5_vl.seeded_tiny_model` (every bias random, every
``*norm*`` weight ``1 + N(0, 0.1)``, which covers the block norms, ``norm_f``, the
gated Mamba norms, the projector RMSNorm and the RADIO LayerNorms):

* every ``nn.Linear`` / ``nn.Conv1d`` weight except ``lm_head``, and the MoE expert and
  router weights, are re-drawn as ``N(0, 1 / fan_in)``. With the stock std 0.02 the Mamba scan
  output is ~1e-3 of the ``D * x`` skip (so a broken scan, clamp or chunk hand-over
  would not show), attention is uniform (so swapped q/k would not show) and relu2
  inputs are tiny. Now each of these mistakes moves the logits by 10-100% of their
  spread: swapped q/k halves, relu for relu2, a group size 64 gated norm, ``D = 0``,
  no dt clamp, fast-forgetting ``A``, swapped KV heads, interpolating the CPE table
  straight to the grid, a transposed pixel shuffle, zeroed cls/register tokens,
  un-scaled projector or gated norms.
* ``A_log``, ``D`` and ``dt_bias`` of every Mamba layer (init ``log(1..H)``, ones, a
  narrow band), the CPE table and the cls/register tokens (init std 0.02, now 0.5) and,
  with ``moe``, the zero-initialised ``e_score_correction_bias``.

Tokenizer (``TokenizersBackend``, byte-level BPE trained in memory): the first 32 ids
are Nemotron's control block, with the ids the real tokenizer uses where they matter:
``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<|im_start|>`` 10, ``<|im_end|>`` 11,
``<think>`` 12, ``</think>`` 13, ``<image>`` 18 (the image context token, the
config's ``image_token_id``), ``<img>`` 19, ``</img>`` 20, ``<so_embedding>`` 27;
``<so_start>`` / ``<so_end>`` sit at 28 / 29 (not checked against the hub) and the
rest are ``<SPECIAL_n>`` fillers. Then 256 byte symbols and learned merges:
:data:`TOKENIZER_SIZE` (340) ids, while the embedding has :data:`TINY_VOCAB_SIZE`
(400) rows, not a multiple of 128. As in the real tokenizer ``<video>`` is *not* a
token: the processor replaces the text ``<video>`` before tokenising. The config's
``video_token_id`` is ``None``; the processor's is whatever ``convert_tokens_to_ids``
gives for an unknown token, the ``<unk>`` id 0, meaningless (and equal to the pad id
here). bos ``<s>`` is not added automatically; eos is ``<|im_end|>``; pad is ``<unk>``
(id 0 = the text config's ``pad_token_id``), or absent with ``pad_token=False``.

Chat template (written for this repo; ChatML as Nemotron 3 uses it)::

    <|im_start|>system\\n{system text, empty if none}<|im_end|>\\n
    <|im_start|>user\\n<image>\\n<image>\\n{text}<|im_end|>\\n      one "<image>\\n" per
    <|im_start|>assistant\\n<think>\\n                              image item, "<video>\\n"
                                                                per video item
The system turn is always there (empty when the conversation has none), earlier
assistant turns are rendered verbatim, and the generation prompt opens a thinking
block (``<think>\\n``), or an empty one (``<think></think>``) with
``enable_thinking=False``.

Processor outputs (``NemotronH_Omni_Reasoning_V3Processor``, ``return_tensors="pt"``):

* ``input_ids``, ``attention_mask``: ``[batch, seq]``; each ``<image>`` of the text
  becomes ``<img>`` + ``<image>`` x n + ``</img>`` with
  ``n = grid_h * grid_w / 4`` (2x2 pixel shuffle).
* ``pixel_values``: ``[sum of grid_h * grid_w over images, 3 * 16 * 16]`` float32,
  flattened channel-major patches of all images of the call, normalised;
  ``image_grid_hw``: ``[num_images, 2]`` patch grid (height, width) of each image.
  Each image is resized (bicubic) to the grid of
  ``get_patch_grid_size``: its own ``ceil``-ish grid (``floor(side / 16) + 1`` unless
  ``side`` is a multiple of 16), scaled into ``[min_num_patches, max_num_patches]`` =
  [16, 48] patches and rounded to even sides. So a 96x64 (w x h) image keeps its 4x6
  grid (6 tokens) and a 40x160 one becomes 10x4 (10 tokens).
* ``pixel_values_videos`` (video calls only): ``[num_videos, num_tubelets, 2 * 3, H, W]``,
  consecutive frame pairs stacked on the channel axis (an odd last frame is
  repeated), every frame resized to the aspect-preserving grid nearest
  ``video_target_num_patches`` (24): 72x48 frames become 4x6 patches (64x96 px), 6 tokens
  per tubelet. ``<video>`` becomes, per tubelet, ``"Frame 1 sampled at 0.00 seconds and
  frame 2 sampled at 0.50 seconds: "`` + ``<img>`` + ``<image>`` x 6 + ``</img>``,
  joined by ``"\\n"`` (the times only when the call has ``video_metadata`` with an
  ``fps``; else ``"Frame 1 and frame 2: "``). Videos use the *image* token id.
  There is no ``video_grid`` output: the model reads the grid off the tensor shape.

Two 5.24 limits shape how batches are built (see :func:`build_inputs`): the processor
accepts videos only with a single prompt, and the model cannot take
``pixel_values`` and ``pixel_values_videos`` in one forward (both scatter into the
``<image>`` positions, and the image branch checks that *all* of them are its own).

Layout written by :func:`build_tiny_nemotron_vl` (transformers 5.24)::

    config.json              NemotronH_Omni_Reasoning_V3_Config: text_config (nemotron_h),
                             vision_config (radio), audio_config null, image_token_id 18
    generation_config.json   greedy, bos <s>, eos [<|im_end|>, </s>], pad <unk> (0)
    model.safetensors        key_format="default" (hub / V2 names, what save_pretrained
                             writes by default):
                               language_model.backbone.{embeddings,layers.N.{norm,mixer.*},norm_f}.*
                               language_model.lm_head.weight
                               vision_model.radio_model.model.patch_generator.{embedder,
                                 video_embedder}.weight, .pos_embed [1, 64, 32],
                                 .cls_token.token [5, 32]
                               vision_model.radio_model.model.blocks.N.{norm1,norm2,
                                 attn.qkv (fused q|k|v), attn.proj, mlp.fc1, mlp.fc2}.*
                               vision_model.radio_model.summary_idxs (int64)
                               mlp1.{0 (RMSNorm), 1, 3 (Linear)}.weight
                             key_format="native" (save_original_format=False, the
                             in-memory names):
                               language_model.model.{embeddings,layers.N.*,norm_f}.*
                               language_model.lm_head.weight
                               vision_model.embeddings.{patch_projection,
                                 video_patch_projection}.weight, .position_embedding,
                                 .cls_register_token
                               vision_model.encoder.layer.N.{norm1,norm2,attention.{q,k,v,o}_proj,
                                 mlp.fc1,mlp.fc2,layer_scale1,layer_scale2}.*
                               vision_model.summary_idxs
                               multi_modal_projector.{layer_norm,linear_1,linear_2}.weight
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    processor_config.json    processor + image processor + video processor + Parakeet
                             feature extractor, all nested (5.24 writes no separate
                             preprocessor_config.json)

Mamba layers hold ``mixer.{in_proj [64+128+8=200, 64], conv1d.weight [128, 1, 4],
conv1d.bias [128], dt_bias [8], A_log [8], D [8], norm.weight [64], out_proj [64, 64]}``
(``in_proj`` rows: gate z 64 | x 64, B 2x16, C 2x16 (the 128 conv channels) | dt 8). With
``moe=True`` the default format writes one ``mixer.experts.E.{up,down}_proj.weight``
per expert, the native format the fused ``mixer.experts.{up,down}_proj`` [E, out, in];
both write ``mixer.gate.weight`` (float32), ``mixer.gate.e_score_correction_bias`` and
``mixer.shared_experts.{up,down}_proj.weight``. With ``vision_final_layernorm=True`` the
LayerNorm is ``vision_projector.vision_final_layernorm.{weight,bias}`` (default) or
``vision_final_layernorm.{weight,bias}`` (native).

5.24 pitfalls met on the way: the omni model casts ``pixel_values`` /
``pixel_values_videos`` to ``vision_config.dtype``, not to the tower's weights, and
``model.to(dtype)`` / ``.float()`` do not update configs, so a checkpoint loaded in
bf16 and then cast to fp32 fails on images (``expected m1 and m2 to have the same
dtype``); load with the wanted ``dtype=`` instead. Reading ``config.torch_dtype`` there
also logs a "``torch_dtype`` is deprecated" warning (harmless).
Without ``mamba_ssm`` / ``causal_conv1d`` (CPU) the reference PyTorch scan runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    BatchFeature,
    GenerationConfig,
    NemotronH_Omni_Reasoning_V3,
    NemotronH_Omni_Reasoning_V3_Config,
    NemotronH_Omni_Reasoning_V3ImageProcessor,
    NemotronH_Omni_Reasoning_V3Processor,
    NemotronH_Omni_Reasoning_V3VideoProcessor,
    ParakeetFeatureExtractor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHExperts,
    NemotronHMamba2Mixer,
    NemotronHTopkRouter,
)
from transformers.models.nemotron_h_omni.image_processing_nemotron_h_omni import get_patch_grid_size
from transformers.models.radio.modeling_radio import RadioPatchEmbeddings

from vlm_bridge.testing.tiny_qwen2_5_vl import seeded_tiny_model

__all__ = [
    "CHAT_TEMPLATE",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_TOKEN_ID",
    "KeyFormat",
    "PROMPT_IMAGES",
    "PROMPT_TEXT",
    "PROMPT_VIDEO",
    "SPECIAL_TOKEN_IDS",
    "TINY_VOCAB_SIZE",
    "TOKENIZER_SIZE",
    "VIDEO_FPS",
    "build_inputs",
    "build_tiny_nemotron_vl",
    "image_token_count",
    "make_tiny_nemotron_model",
    "make_tiny_nemotron_processor",
    "make_tiny_nemotron_tokenizer",
    "tiny_nemotron_vl_config",
]

KeyFormat = Literal["default", "native"]

# --- tokenizer -----------------------------------------------------------------------------

# Nemotron's tokenizer opens with a block of control tokens (1000 on the hub). The names
# below sit at their hub ids; the fillers keep those ids without inventing meanings.
_NAMED_SPECIAL_IDS: dict[str, int] = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|im_start|>": 10,
    "<|im_end|>": 11,
    "<think>": 12,
    "</think>": 13,
    "<image>": 18,
    "<img>": 19,
    "</img>": 20,
    "<so_embedding>": 27,
    "<so_start>": 28,
    "<so_end>": 29,
}
NUM_SPECIAL_TOKENS = 32
_ID_TO_NAME = {idx: tok for tok, idx in _NAMED_SPECIAL_IDS.items()}
SPECIAL_TOKENS: tuple[str, ...] = tuple(
    _ID_TO_NAME.get(idx, f"<SPECIAL_{idx}>") for idx in range(NUM_SPECIAL_TOKENS)
)
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: idx for idx, tok in enumerate(SPECIAL_TOKENS)}
# 256 byte symbols + 52 merges after the control block: 340 ids in all.
NUM_BPE_TOKENS = 308
TOKENIZER_SIZE = NUM_SPECIAL_TOKENS + NUM_BPE_TOKENS  # 340
# Embedding rows beyond the tokenizer and not a multiple of 128 (the hub's 131072 is both
# the tokenizer size and a multiple of 128; this makes vocab-padding code paths run).
TINY_VOCAB_SIZE = 400

UNK_TOKEN_ID = SPECIAL_TOKEN_IDS["<unk>"]
BOS_TOKEN_ID = SPECIAL_TOKEN_IDS["<s>"]
EOS_TOKEN_ID = SPECIAL_TOKEN_IDS["</s>"]
IM_END_ID = SPECIAL_TOKEN_IDS["<|im_end|>"]
IMAGE_TOKEN_ID = SPECIAL_TOKEN_IDS["<image>"]
IMAGE_START_ID = SPECIAL_TOKEN_IDS["<img>"]
IMAGE_END_ID = SPECIAL_TOKEN_IDS["</img>"]
PAD_TOKEN_ID = UNK_TOKEN_ID

# Letters with an optional leading non-letter (" word"), digits one by one, punctuation
# runs, newline runs, other whitespace: the usual byte-level BPE split.
_PRETOKENIZE_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Small built-in corpus: merges only need to be stable. It holds the template's role
# names and the processor's video frame labels so prompts stay short.
_TRAINING_CORPUS: tuple[str, ...] = (
    "system\nYou are a helpful assistant.\n",
    "user\nDescribe the image in one sentence.\n",
    "assistant\nThe image shows a red square and a blue circle on a green background.",
    "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: ",
    "Frame 3 sampled at 1.00 seconds and frame 4 sampled at 1.50 seconds: ",
    "What happens in this video? A square moves from the top left to the bottom right.",
    "Compare the two pictures and tell me which one is larger.",
    "Write a short poem about shapes, colours and motion.",
)

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set ns.system = messages[0]['content'] -%}\n"
    "    {%- else -%}\n"
    "        {%- for item in messages[0]['content'] -%}\n"
    "            {%- if item['type'] == 'text' -%}\n"
    "                {%- set ns.system = ns.system + item['text'] -%}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}\n"
    "{%- for message in loop_messages -%}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{- message['content'] -}}\n"
    "    {%- else -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}\n"
    "            {%- elif item['type'] == 'video' -%}{{- '<video>\\n' -}}\n"
    "            {%- elif item['type'] == 'text' -%}{{- item['text'] -}}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<|im_start|>assistant\\n' -}}\n"
    "    {%- if enable_thinking is defined and not enable_thinking -%}{{- '<think></think>' -}}\n"
    "    {%- else -%}{{- '<think>\\n' -}}\n"
    "    {%- endif -%}\n"
    "{%- endif -%}\n"
)

# --- model dimensions ----------------------------------------------------------------------

TEXT_HIDDEN_SIZE = 64
HYBRID_PATTERN = "M-M*-M*-"
MOE_HYBRID_PATTERN = "MEM*EM*E"
_PATTERN_TO_BLOCK = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
MAX_POSITION_EMBEDDINGS = 4096
TIME_STEP_MIN = 0.05

TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN_SIZE,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "attention_bias": False,
    # Not a multiple of hidden: a transposed MLP weight cannot pass a shape check.
    "intermediate_size": 96,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "use_conv_bias": True,
    "mamba_proj_bias": False,
    "use_bias": False,
    "mamba_hidden_act": "silu",
    # Unused by 5.24 (d_inner = heads * head_dim); kept != d_inner / hidden as on the hub.
    "expand": 2,
    "chunk_size": 8,
    "time_step_min": TIME_STEP_MIN,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": False,
    "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}

TINY_MOE_TEXT_CONFIG: dict[str, Any] = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 48,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
}

PATCH_SIZE = 16
DOWNSAMPLE_RATIO = 0.5
MERGE_SIZE = 2  # 1 / downsample_ratio
VIDEO_TEMPORAL_PATCH_SIZE = 2
VISION_HIDDEN_SIZE = 32
PROJECTOR_HIDDEN_SIZE = 48
# 128 px / 16 = an 8x8 CPE table.
MAX_IMG_SIZE = 128
# Unused by the 5.24 forward (dynamic resolution); present on the hub (512 there).
FORCE_IMAGE_SIZE = 64

TINY_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": VISION_HIDDEN_SIZE,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2.0,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
    "num_channels": 3,
    "patch_size": PATCH_SIZE,
    "image_size": FORCE_IMAGE_SIZE,
    "max_img_size": MAX_IMG_SIZE,
    # >= 2 cls tokens keep the default summary_idxs [0, 1] in range on the dense (video) path.
    "num_cls_tokens": 2,
    "num_registers": 3,
    "video_temporal_patch_size": VIDEO_TEMPORAL_PATCH_SIZE,
}

# --- processor sizes -----------------------------------------------------------------------

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Per-image patch budget: 4x4 .. 48 patches (4 .. 12 image tokens).
MIN_NUM_PATCHES = 16
MAX_NUM_PATCHES = 48
# Frames are resized to the aspect-preserving grid nearest 24 patches (e.g. 4x6).
VIDEO_TARGET_NUM_PATCHES = 24
# Frame rate assumed for in-memory clips (frame labels "sampled at 0.50 seconds").
VIDEO_FPS = 2.0

PROMPT_IMAGES = "Compare the two pictures."
PROMPT_VIDEO = "What happens in this video?"
PROMPT_TEXT = "Write a short poem about shapes."


def tiny_nemotron_vl_config(
    *, moe: bool = False, vision_final_layernorm: bool = False, **overrides: Any
) -> NemotronH_Omni_Reasoning_V3_Config:
    """Return the tiny Nemotron-H Omni config, optionally with overrides.

    ``text_config`` / ``vision_config`` overrides are dicts merged into the tiny defaults
    (``text_config={"chunk_size": 4}`` changes only that field); any other keyword is a
    top-level field. ``moe`` swaps the dense MLP layers for MoE layers;
    ``vision_final_layernorm`` sets ``num_nextn_predict_layers`` 1 (see the module
    docstring).
    """
    pattern = MOE_HYBRID_PATTERN if moe else HYBRID_PATTERN
    text_config = {
        **TINY_TEXT_CONFIG,
        **(TINY_MOE_TEXT_CONFIG if moe else {}),
        "layers_block_type": [_PATTERN_TO_BLOCK[char] for char in pattern],
        "num_nextn_predict_layers": 1 if vision_final_layernorm else 0,
        **overrides.pop("text_config", {}),
    }
    vision_config = {**TINY_VISION_CONFIG, **overrides.pop("vision_config", {})}
    top_level: dict[str, Any] = {
        "audio_config": None,
        "force_image_size": FORCE_IMAGE_SIZE,
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "projector_hidden_size": PROJECTOR_HIDDEN_SIZE,
        "vision_hidden_size": VISION_HIDDEN_SIZE,
        "video_temporal_patch_size": VIDEO_TEMPORAL_PATCH_SIZE,
        "video_pruning_rate": 0.0,
        "image_token_id": IMAGE_TOKEN_ID,
        # Videos reuse <image>; the tokenizer has no <video> token (as on the hub).
        "video_token_id": None,
        "audio_token_id": SPECIAL_TOKEN_IDS["<so_embedding>"],
        "tie_word_embeddings": False,
        **overrides,
    }
    return NemotronH_Omni_Reasoning_V3_Config(
        text_config=text_config, vision_config=vision_config, **top_level
    )


def _train_byte_level_bpe() -> Tokenizer:
    """Train the tokenizer in memory (deterministic for a fixed corpus).

    The trainer places the control tokens first, at ids 0..31, then the 256 byte
    symbols and the merges.
    """
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS],
    )
    tokenizer.train_from_iterator(list(_TRAINING_CORPUS), trainer=trainer)
    return tokenizer


def make_tiny_nemotron_tokenizer(pad_token: bool = True) -> PreTrainedTokenizerFast:
    """The tiny Nemotron tokenizer (``TokenizersBackend``), built in memory.

    Control ids are in :data:`SPECIAL_TOKEN_IDS`; bos ``<s>`` (not added by default),
    eos ``<|im_end|>``, unk ``<unk>``, pad ``<unk>`` unless ``pad_token=False`` (a
    tokenizer without a pad token, as some hub tokenizers are). The image tokens are
    registered as the named extra special tokens ``image_token`` / ``image_start_token`` /
    ``image_end_token`` that the processor reads.
    """
    backend = _train_byte_level_bpe()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<unk>" if pad_token else None,
        extra_special_tokens={
            "image_token": "<image>",
            "image_start_token": "<img>",
            "image_end_token": "</img>",
        },
        model_max_length=MAX_POSITION_EMBEDDINGS,
        chat_template=CHAT_TEMPLATE,
    )
    actual = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    if actual != SPECIAL_TOKEN_IDS or len(tokenizer) != TOKENIZER_SIZE:
        raise RuntimeError(f"tiny tokenizer ids {actual} (size {len(tokenizer)}) != {SPECIAL_TOKEN_IDS}")
    return tokenizer


def make_tiny_nemotron_processor(
    tokenizer: PreTrainedTokenizerFast | None = None, *, pad_token: bool = True
) -> NemotronH_Omni_Reasoning_V3Processor:
    """Build the processor with patch budgets small enough for the tiny tests.

    ``max_model_len`` is kept at the text context (4096) so it never limits the
    per-image budget, which then is exactly ``[MIN_NUM_PATCHES, MAX_NUM_PATCHES]``.
    """
    tokenizer = tokenizer if tokenizer is not None else make_tiny_nemotron_tokenizer(pad_token=pad_token)
    image_processor = NemotronH_Omni_Reasoning_V3ImageProcessor(
        patch_size=PATCH_SIZE,
        downsample_ratio=DOWNSAMPLE_RATIO,
        min_num_patches=MIN_NUM_PATCHES,
        max_num_patches=MAX_NUM_PATCHES,
        max_model_len=MAX_POSITION_EMBEDDINGS,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    video_processor = NemotronH_Omni_Reasoning_V3VideoProcessor(
        patch_size=PATCH_SIZE,
        downsample_ratio=DOWNSAMPLE_RATIO,
        norm_mean=list(CLIP_MEAN),
        norm_std=list(CLIP_STD),
        video_target_num_patches=VIDEO_TARGET_NUM_PATCHES,
        video_maintain_aspect_ratio=True,
        temporal_patch_size=VIDEO_TEMPORAL_PATCH_SIZE,
    )
    return NemotronH_Omni_Reasoning_V3Processor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        # Required by 5.24 even without audio; unused (audio_config is None).
        feature_extractor=ParakeetFeatureExtractor(),
        chat_template=CHAT_TEMPLATE,
        video_temporal_patch_dim=VIDEO_TEMPORAL_PATCH_SIZE,
    )


def image_token_count(width: int, height: int) -> int:
    """``<image>`` placeholders the tiny processor emits for one ``width`` x ``height`` image.

    Follows ``get_patch_grid_size`` with the tiny budgets (one image per call or several
    with the same budget: ``max_model_len`` never binds here).
    """
    grid_h, grid_w = get_patch_grid_size(
        height, width, PATCH_SIZE, MERGE_SIZE, MIN_NUM_PATCHES, MAX_NUM_PATCHES
    )
    return grid_h * grid_w // MERGE_SIZE**2


def _randomise_nemotron_parameters(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Re-draw the parameters whose stock init would hide conversion mistakes (module docstring)."""

    def fan_in_normal(weight: torch.Tensor, fan_in: int) -> None:
        weight.copy_(torch.randn(weight.shape, generator=generator) * fan_in**-0.5)

    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) and module is not lm_head:
                # (Conv1d: the depthwise Mamba conv, fan-in = kernel size)
                fan_in_normal(module.weight, module.weight[0].numel())
            elif isinstance(module, NemotronHExperts):
                fan_in_normal(module.up_proj, module.up_proj.shape[-1])
                fan_in_normal(module.down_proj, module.down_proj.shape[-1])
            if isinstance(module, NemotronHMamba2Mixer):
                heads = module.num_heads
                # A = -exp(A_log) between about -0.4 and -7, in no particular order
                module.A_log.copy_(torch.rand(heads, generator=generator) * 3.0 - 1.0)
                module.D.copy_(1.0 + torch.randn(heads, generator=generator) * 0.5)
                # Half of the heads: softplus(dt_bias) ~ 1e-3, far under time_step_min (0.05), so
                # the clamp really acts; the others start at softplus(-2.5) = 0.08, up to 1.3.
                low = -7.0 + torch.rand(heads, generator=generator) * 0.5
                high = -2.5 + torch.rand(heads, generator=generator) * 3.5
                clamped = torch.randperm(heads, generator=generator)[: heads // 2]
                dt_bias = high.clone()
                dt_bias[clamped] = low[clamped]
                module.dt_bias.copy_(dt_bias)
            elif isinstance(module, NemotronHTopkRouter):
                fan_in_normal(module.weight, module.weight.shape[1])
                # zero-initialised buffer that shifts the expert choice (not the weights)
                bias = module.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
            elif isinstance(module, RadioPatchEmbeddings):
                for param in (module.position_embedding, module.cls_register_token):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def make_tiny_nemotron_model(
    config: NemotronH_Omni_Reasoning_V3_Config, seed: int = 0, dtype: torch.dtype = torch.float32
) -> NemotronH_Omni_Reasoning_V3:
    """The tiny Nemotron-H Omni with seeded weights (see the module docstring)."""
    model = seeded_tiny_model(
        NemotronH_Omni_Reasoning_V3, config, seed, dtype, extra_init=_randomise_nemotron_parameters
    )
    # The omni model casts pixel values to vision_config.dtype, not to the weights' dtype,
    # and .to(dtype) does not update configs: without this a bf16 model gets fp32 pixels.
    for config_ in (model.config, model.config.text_config, model.config.vision_config):
        config_.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=[IM_END_ID, EOS_TOKEN_ID],
        do_sample=False,
    )
    return model


def drop_layer_scale(out_dir: Path) -> None:
    """Remove RADIO's identity LayerScale tensors from the saved (hub-format) files."""
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for path in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(path))
        kept = {key: value for key, value in tensors.items() if ".layer_scale" not in key}
        if len(kept) != len(tensors):
            save_file(kept, str(path), metadata={"format": "pt"})
    if index is not None:
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".layer_scale" not in k}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tiny_nemotron_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    pad_token: bool = True,
    key_format: KeyFormat = "default",
    moe: bool = False,
    vision_final_layernorm: bool = False,
    max_shard_size: str | None = None,
    time_step_min: float = TIME_STEP_MIN,
    form: Literal["omni", "v2"] = "omni",
) -> Path:
    """Write a complete tiny Nemotron-H Omni checkpoint folder and return its path.

    The folder loads offline with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``. Weights are deterministic in ``seed``.
    ``pad_token=False`` saves a tokenizer without a pad token. ``key_format`` picks the
    safetensors names: ``"default"`` (hub / V2 names, ``save_pretrained``'s default,
    minus RADIO's identity LayerScale) or ``"native"`` (``save_original_format=False``,
    the module names). ``moe`` / ``vision_final_layernorm`` select the variants of
    :func:`tiny_nemotron_vl_config`; ``max_shard_size`` (e.g. ``"100KB"``) forces a
    sharded checkpoint with an index. ``time_step_min`` sets the ``dt`` floor HF applies in its
    chunked scan but not when decoding from its cache (a tiny value switches it off).
    ``form="v2"`` writes the original ``NemotronH_Nano_VL_V2`` hub form instead
    (:mod:`vlm_bridge.testing.tiny_nemotron_v2`; dense, V2 key names only).
    """
    if form == "v2":
        from vlm_bridge.testing.tiny_nemotron_v2 import build_tiny_nemotron_v2

        if moe or vision_final_layernorm or key_format != "default":
            raise ValueError("the tiny V2 form is dense, without a vision final norm, in V2 key names")
        return build_tiny_nemotron_v2(out_dir, seed=seed, dtype=dtype, pad_token=pad_token,
                                      max_shard_size=max_shard_size, time_step_min=time_step_min)
    if key_format not in ("default", "native"):
        raise ValueError(f"key_format must be 'default' or 'native', got {key_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_nemotron_vl_config(moe=moe, vision_final_layernorm=vision_final_layernorm,
                                     text_config={"time_step_min": time_step_min})
    model = make_tiny_nemotron_model(config, seed=seed, dtype=dtype)
    save_kwargs: dict[str, Any] = {"save_original_format": key_format == "default"}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out_dir), **save_kwargs)
    if key_format == "default":
        drop_layer_scale(out_dir)
    processor = make_tiny_nemotron_processor(pad_token=pad_token)
    processor.tokenizer.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return out_dir


def _user_turn(items: list[dict[str, str]], prompt: str) -> list[dict[str, Any]]:
    """One-user-message conversation: media placeholders first, then the question."""
    return [{"role": "user", "content": [*items, {"type": "text", "text": prompt}]}]


def build_inputs(
    processor: NemotronH_Omni_Reasoning_V3Processor,
    *,
    images: Sequence[Image.Image] = (),
    video: Sequence[Image.Image] | None = None,
    text_only_row: bool = False,
    padding_side: Literal["left", "right"] = "left",
) -> BatchFeature:
    """Build one padded batch through the chat template and the processor.

    Rows, in order and only when their media is given: all ``images`` in one row, then a
    text-only row; or, with ``video`` (a list of PIL frames taken at :data:`VIDEO_FPS`),
    the video alone: 5.24's processor takes videos only with a single prompt and the
    model cannot mix images and videos in one forward, so ``video`` excludes the other
    rows. Several rows are padded, on the left by default, as HF ``generate`` (and the
    Mamba state) want; a single row is not padded, so it needs no pad token.
    The result holds ``input_ids``, ``attention_mask`` and either
    ``pixel_values``/``image_grid_hw`` or ``pixel_values_videos``.
    """
    if video is not None:
        if images or text_only_row:
            raise ValueError("a video batch holds the video row only (see the docstring)")
        text = processor.apply_chat_template(
            _user_turn([{"type": "video"}], PROMPT_VIDEO), add_generation_prompt=True, tokenize=False
        )
        metadata = [{"total_num_frames": len(video), "fps": VIDEO_FPS}]
        return processor(
            text=[text],
            videos=[list(video)],
            video_metadata=metadata,
            padding_side=padding_side,
            return_tensors="pt",
        )
    conversations = []
    if images:
        conversations.append(_user_turn([{"type": "image"}] * len(images), PROMPT_IMAGES))
    if text_only_row:
        conversations.append(_user_turn([], PROMPT_TEXT))
    if not conversations:
        raise ValueError("build_inputs needs at least one of images, video or text_only_row")
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    media: dict[str, Any] = {"images": list(images)} if images else {}
    # one row needs no padding (nor a pad token)
    padding = len(texts) > 1
    return processor(text=texts, padding=padding, padding_side=padding_side, return_tensors="pt", **media)
