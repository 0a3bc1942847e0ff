"""The original ``NemotronH_Nano_VL_V2`` hub config, translated without its remote code.

The hub ``config.json`` names its own ``configuration.py`` (``auto_map``). Its fields map onto
transformers' ``NemotronH_Omni_Reasoning_V3_Config`` (which already accepts the V2-era names
``llm_config``, ``img_context_token_id``, ``vit_hidden_size``) except the vision tower: V2's
``vision_config`` is RADIO's own config, whose ViT comes from a timm model name
(``args.model``, e.g. ``vit_huge_patch16_224``) plus timm keyword arguments (``args.model_kwargs``),
and whose class and register tokens follow from the teachers:

* one class token per distinct teacher name when ``cls_token_per_teacher`` (else one);
* registers that pad the prefix to a multiple of ``register_multiple`` (C-RADIOv2-H: 4 + 4 = 8);
* a CPE position table of ``cpe_max_size`` pixels per side.

V2 has no video tubelet embedder (video frames are images), so the translated vision config has
no ``video_temporal_patch_size``. Fields V2 has and the family does not need (``template``,
``use_thumbnail``, ``norm_mean``/``norm_std``) are read by the processor from the same file.
"""

from __future__ import annotations

from typing import Any

from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

V2_ARCHITECTURE = "NemotronH_Nano_VL_V2"

# timm ViT names RADIO builds on -> (hidden, layers, heads); the MLP is 4x hidden unless
# args.model_kwargs says otherwise
TIMM_VIT_DIMS = {
    "vit_tiny_patch16": (192, 12, 3),
    "vit_small_patch16": (384, 12, 6),
    "vit_base_patch16": (768, 12, 12),
    "vit_large_patch16": (1024, 24, 16),
    "vit_huge_patch16": (1280, 32, 16),
}
# remote-code bookkeeping that must not reach transformers' configs
_DROP = ("auto_map", "architectures", "_name_or_path", "transformers_version")


def _vit_dims(args: dict) -> tuple[int, int, int, float]:
    name = str(args.get("model", ""))
    kwargs = args.get("model_kwargs") or {}
    base = next((dims for prefix, dims in TIMM_VIT_DIMS.items() if name.startswith(prefix)), None)
    if base is None and not {"embed_dim", "depth", "num_heads"} <= set(kwargs):
        raise ValueError(f"vision_config.args.model {name!r}: unknown RADIO backbone "
                         f"(known: {', '.join(TIMM_VIT_DIMS)})")
    hidden, layers, heads = base or (None, None, None)
    return (int(kwargs.get("embed_dim", hidden)), int(kwargs.get("depth", layers)),
            int(kwargs.get("num_heads", heads)), float(kwargs.get("mlp_ratio", 4.0)))


def prefix_tokens(args: dict) -> tuple[int, int]:
    """``(class tokens, registers)`` of a RADIO tower from its ``args``."""
    teachers = args.get("teachers") or []
    num_cls = len({t["name"] for t in teachers}) if args.get("cls_token_per_teacher") and teachers else 1
    multiple = int(args.get("register_multiple") or 0)
    registers = multiple - num_cls % multiple if multiple else 0
    return num_cls, registers


def radio_config_dict(vision: dict, top: dict) -> dict[str, Any]:
    """transformers' ``RadioConfig`` fields for V2's remote RADIO config."""
    args = vision.get("args") or {}
    hidden, layers, heads, mlp_ratio = _vit_dims(args)
    num_cls, registers = prefix_tokens(args)
    patch = int(vision.get("patch_size", 16))
    return {
        "model_type": "radio", "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "mlp_ratio": mlp_ratio, "patch_size": patch,
        "image_size": int(top.get("force_image_size") or 512),
        "max_img_size": int(args.get("cpe_max_size") or vision.get("max_resolution") or 2048),
        "num_cls_tokens": num_cls, "num_registers": registers,
        # timm's ViT: LayerNorm eps 1e-6, qkv bias, exact GELU
        "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu",
        "norm_mean": list(top.get("norm_mean") or OPENAI_CLIP_MEAN),
        "norm_std": list(top.get("norm_std") or OPENAI_CLIP_STD),
        # checked equal to the top-level value by transformers; removed after construction
        "video_temporal_patch_size": 2,
    }


def translate_v2_config(raw: dict):
    """A V2 hub ``config.json`` (as a dict) -> ``NemotronH_Omni_Reasoning_V3_Config``."""
    from transformers import NemotronH_Omni_Reasoning_V3_Config

    for name in ("llm_config", "vision_config"):
        if not isinstance(raw.get(name), dict):
            raise ValueError(f"{V2_ARCHITECTURE} config has no {name} object")
    if raw.get("ps_version", "v2") != "v2":
        raise ValueError(f"ps_version {raw['ps_version']!r} is not supported (v2 pixel shuffle only)")
    if raw.get("image_tag_type", "internvl") != "internvl":
        raise ValueError(f"image_tag_type {raw['image_tag_type']!r} is not supported "
                         "(internvl: <img>...</img>)")
    image_token_id = raw.get("img_context_token_id", raw.get("image_context_token_id"))
    if image_token_id is None:
        raise ValueError(f"{V2_ARCHITECTURE} config has no img_context_token_id")
    text = {k: v for k, v in raw["llm_config"].items() if k not in _DROP}
    text["model_type"] = "nemotron_h"
    config = NemotronH_Omni_Reasoning_V3_Config(
        text_config=text,
        vision_config=radio_config_dict(raw["vision_config"], raw),
        force_image_size=raw.get("force_image_size"),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        projector_hidden_size=int(raw["projector_hidden_size"]),
        vision_hidden_size=int(raw.get("vit_hidden_size", raw.get("vision_hidden_size", 1280))),
        video_pruning_rate=float(raw.get("video_pruning_rate") or 0.0),
        image_token_id=int(image_token_id),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    # V2 embeds video frames as images: no tubelet projection is built or expected on disk
    config.vision_config.video_temporal_patch_size = None
    config.vision_config.video_patch_dim = None
    return config
