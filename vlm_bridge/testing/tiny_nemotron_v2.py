"""A tiny ``NemotronH_Nano_VL_V2`` hub folder: shaped like the original upload, with remote code.

What the folder holds, as the hub's does:

* ``config.json``: ``architectures``/``model_type`` ``NemotronH_Nano_VL_V2`` with an ``auto_map``
  into its own ``configuration.py`` / ``modeling.py``; the language model under ``llm_config``
  (``hybrid_override_pattern``, a NemotronH config with its own ``auto_map``); the RADIO tower as
  RADIO's remote config (``args.model`` a timm name, ``args.model_kwargs`` the timm keyword
  arguments that shrink it, teachers with one class token each, ``register_multiple`` 8, so
  2 class tokens + 6 registers); ``force_image_size`` (64 px tiles here, 512 on the hub),
  ``ps_version`` v2, ``img_context_token_id``, token strings, CLIP statistics, ``use_thumbnail``;
* weights under the V2 names (``language_model.backbone.*``, ``vision_model.radio_model.*`` with
  fused ``attn.qkv``, ``mlp1.*``) plus RADIO's ``input_conditioner`` statistics, no video embedder;
* the tokenizer and chat template of the tiny family folder, a ``preprocessor_config.json`` that
  names the remote image processor (``max_num_tiles`` 6), and the remote ``*.py`` files, which
  raise if anything ever imports them.

The weights are the tiny Omni model's for the translated config (same seeds), so the folder is
read by transformers' native classes with ``config=`` the translation and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlm_bridge.families.nemotron_vl.v2_config import translate_v2_config
from vlm_bridge.testing import tiny_nemotron_vl as omni

TILE_SIZE = 64
MAX_NUM_TILES = 6
REMOTE_FILES = ("configuration.py", "modeling.py", "processing.py", "image_processing.py")
_REMOTE_STUB = 'raise RuntimeError("the remote code of this folder was run")\n'


def tiny_v2_config_dict(time_step_min: float = omni.TIME_STEP_MIN) -> dict[str, Any]:
    """The tiny V2 ``config.json`` contents."""
    llm = {
        **omni.TINY_TEXT_CONFIG, "time_step_min": time_step_min,
        "hybrid_override_pattern": omni.HYBRID_PATTERN, "model_type": "nemotron_h",
        "architectures": ["NemotronHForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
    }
    vision = {
        "model_type": "radio", "version": "radio_v2.5-h", "patch_size": omni.PATCH_SIZE,
        "max_resolution": omni.MAX_IMG_SIZE, "preferred_resolution": [TILE_SIZE, TILE_SIZE],
        "auto_map": {"AutoConfig": "nvidia/C-RADIOv2-H--hf_model.RADIOConfig"},
        "args": {
            "model": "vit_huge_patch16_224",
            "model_kwargs": {"embed_dim": omni.VISION_HIDDEN_SIZE, "depth": 2, "num_heads": 2,
                             "mlp_ratio": 2.0},
            "cpe_max_size": omni.MAX_IMG_SIZE, "register_multiple": 8, "cls_token_per_teacher": True,
            "teachers": [{"name": "clip", "use_summary": True}, {"name": "dino", "use_summary": True},
                         {"name": "clip", "use_summary": False}],
        },
    }
    return {
        "architectures": ["NemotronH_Nano_VL_V2"], "model_type": "NemotronH_Nano_VL_V2",
        "auto_map": {"AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config",
                     "AutoModel": "modeling.NemotronH_Nano_VL_V2",
                     "AutoModelForCausalLM": "modeling.NemotronH_Nano_VL_V2"},
        "llm_config": llm, "vision_config": vision,
        "force_image_size": TILE_SIZE, "patch_size": omni.PATCH_SIZE,
        "downsample_ratio": omni.DOWNSAMPLE_RATIO,
        "ps_version": "v2", "image_tag_type": "internvl", "template": "nemotron-h-5p5",
        "projector_hidden_size": omni.PROJECTOR_HIDDEN_SIZE, "vit_hidden_size": omni.VISION_HIDDEN_SIZE,
        "img_context_token_id": omni.IMAGE_TOKEN_ID, "img_context_token": "<image>",
        "img_start_token": "<img>", "img_end_token": "</img>", "video_context_token": "<video>",
        "norm_mean": omni.CLIP_MEAN, "norm_std": omni.CLIP_STD, "use_thumbnail": True,
        "video_pruning_rate": 0.0, "torch_dtype": "float32",
    }


def _add_input_conditioner(out_dir: Path) -> None:
    """RADIO's input statistics, stored on the hub although the processor normalises."""
    extra = {
        "vision_model.radio_model.input_conditioner.norm_mean": torch.tensor(omni.CLIP_MEAN).view(3, 1, 1),
        "vision_model.radio_model.input_conditioner.norm_std": torch.tensor(omni.CLIP_STD).view(3, 1, 1),
    }
    first = sorted(out_dir.glob("*.safetensors"))[0]
    save_file({**load_file(str(first)), **extra}, str(first), metadata={"format": "pt"})
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"].update({name: first.name for name in extra})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tiny_nemotron_v2(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                           pad_token: bool = True, max_shard_size: str | None = None,
                           time_step_min: float = omni.TIME_STEP_MIN) -> Path:
    """Write the tiny V2 hub folder (see the module docstring) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = tiny_v2_config_dict(time_step_min)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    model = omni.make_tiny_nemotron_model(translate_v2_config(raw), seed=seed, dtype=dtype)
    save_kwargs: dict[str, Any] = {"save_original_format": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    # transformers validates the config on save, and V2's (no tubelet size) fails its check
    # that the vision and top-level tubelet sizes agree; config.json is replaced below anyway
    model.config.vision_config.video_temporal_patch_size = model.config.video_temporal_patch_size
    model.save_pretrained(str(out_dir), **save_kwargs)
    omni.drop_layer_scale(out_dir)
    _add_input_conditioner(out_dir)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tokenizer = omni.make_tiny_nemotron_tokenizer(pad_token=pad_token)
    tokenizer.chat_template = omni.CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoImageProcessor": "image_processing.NemotronNanoVLV2ImageProcessor",
                     "AutoProcessor": "processing.NemotronNanoVLV2Processor"},
        "image_processor_type": "NemotronNanoVLV2ImageProcessor",
        "processor_class": "NemotronNanoVLV2Processor",
        "image_size": TILE_SIZE, "max_num_tiles": MAX_NUM_TILES, "use_thumbnail": True,
        "norm_mean": omni.CLIP_MEAN, "norm_std": omni.CLIP_STD,
    }, indent=2) + "\n")
    for name in REMOTE_FILES:
        (out_dir / name).write_text(_REMOTE_STUB)
    return out_dir
