"""The original NemotronH_Nano_VL_V2 hub form, read without its remote code: the config translation
on a folder shaped like the 12B upload, V2's tiles / thumbnail / frame prompts, images and a video
in one row against transformers' native classes, and bad V2 configs failing with one line.
(Parity at TP=1/2, PP=2, round trips, training and generation run for this form with every family
test, as the ``nemotron_vl-v2`` case, and in test_nemotron_vl.py's layout round trips.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlm_bridge.parallel import ParallelConfig, run_parallel

TOL = 1e-4
# Shaped like the 12B upload's config.json (values from its public configuration and model code).
PATTERN_12B = "M-M-M-M*-" * 6 + "M-M-M-M-"


def hub_12b_config() -> dict:
    return {
        "architectures": ["NemotronH_Nano_VL_V2"], "model_type": "NemotronH_Nano_VL_V2",
        "auto_map": {"AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config",
                     "AutoModel": "modeling.NemotronH_Nano_VL_V2"},
        "llm_config": {
            "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
            "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
            "hybrid_override_pattern": PATTERN_12B, "hidden_size": 5120, "intermediate_size": 20480,
            "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "mamba_num_heads": 128,
            "mamba_head_dim": 80, "n_groups": 8, "ssm_state_size": 128, "vocab_size": 131072,
            "mlp_hidden_act": "relu2", "chunk_size": 128, "time_step_min": 0.001,
        },
        "vision_config": {
            "model_type": "radio", "version": "radio_v2.5-h", "patch_size": 16, "max_resolution": 2048,
            "preferred_resolution": [512, 512],
            "args": {"model": "vit_huge_patch16_224", "cpe_max_size": 2048, "register_multiple": 8,
                     "cls_token_per_teacher": True,
                     "teachers": [{"name": n} for n in ("clip", "siglip", "dino_v2", "sam")]},
        },
        "force_image_size": 512, "patch_size": 16, "downsample_ratio": 0.5, "ps_version": "v2",
        "image_tag_type": "internvl", "projector_hidden_size": 20480, "vit_hidden_size": 1280,
        "img_context_token_id": 131072, "use_thumbnail": True, "torch_dtype": "bfloat16",
    }


def test_hub_shaped_config_translates_to_native_classes():
    from vlm_bridge.families.nemotron_vl.config import build_configs
    from vlm_bridge.families.nemotron_vl.v2_config import translate_v2_config

    config = translate_v2_config(hub_12b_config())
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1280, 32, 16)
    assert (vision.num_cls_tokens, vision.num_registers, vision.max_img_size) == (4, 4, 2048)
    assert vision.video_temporal_patch_size is None and config.image_token_id == 131072
    assert "".join({"linear_attention": "M", "mlp": "-", "full_attention": "*"}[t]
                   for t in text.layers_block_type) == PATTERN_12B
    assert not hasattr(text, "auto_map")
    _, vision_cfg, settings = build_configs(config, torch.bfloat16)
    assert settings.num_prefix_tokens == 8 and settings.position_grid == 128
    assert settings.temporal_patch_size is None and vision_cfg.ffn_hidden_size == 5120


def test_tiles_thumbnail_and_frame_prompts(nemotron_v2, monkeypatch):
    """A wide image is 2 tiles + thumbnail, a square one a single tile; each tile is one (4 x 4)
    grid of 4 tokens; video frames are one tile each with V2's labels; no remote code, no prompt."""
    from vlm_bridge.loading import load_processor
    from vlm_bridge.testing.media import make_image, make_video_frames

    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted on the terminal"))
    processor = load_processor(nemotron_v2)
    text = "<image> and <image> then <video>"
    frames = make_video_frames(3, 96, 80)
    out = processor(text=[text], images=[make_image(150, 70), make_image(64, 64)], videos=[frames],
                    video_metadata=[{"fps": 2.0, "frames_indices": [0, 2, 4]}], return_tensors="pt")
    assert out["image_grid_hw"].tolist() == [[4, 4]] * (3 + 1 + 3)
    assert out["pixel_values"].shape == (7 * 16, 3 * 16 * 16)
    decoded = processor.decode(out["input_ids"][0])
    run = "<img>" + "<image>" * 12 + "</img> and <img>" + "<image>" * 4 + "</img> then "
    assert decoded.startswith(run), decoded
    assert "Frame 1 sampled at 0.00 seconds: <img><image><image><image><image></img>\nFrame 2 sampled at " \
           "1.00 seconds: " in decoded
    with pytest.raises(ValueError, match="more image placeholders in the text than images given"):
        processor(text=["<image><image>"], images=[make_image(64, 64)])


def _image_and_video_row(hf_dir: str) -> dict:
    """One row holding an image and a video (V2 embeds frames as images), plus a text-only row."""
    from vlm_bridge.inference.requests import ensure_pad_token
    from vlm_bridge.loading import load_hf, load_hf_model, load_processor
    from vlm_bridge.parallel import init_distributed
    from vlm_bridge.runtime import pipeline_forward_logits
    from vlm_bridge.testing.media import make_image, make_video_frames

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    built.model.eval()
    processor = load_processor(hf_dir)
    assert processor.tokenizer.pad_token is None  # as on the hub
    ensure_pad_token(processor.tokenizer)  # what every shared batching path does
    rows = [[{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same colours?"}],
            [{"type": "text", "text": "Say hi."}]]
    texts = processor.apply_chat_template([[{"role": "user", "content": c}] for c in rows],
                                          add_generation_prompt=True, tokenize=False)
    batch = processor(text=texts, images=[make_image(120, 90)], videos=[make_video_frames(3, 80, 64)],
                      video_metadata=[{"fps": 2.0}], padding=True, padding_side="left", return_tensors="pt")
    hf = load_hf_model(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**batch).logits
        ours = pipeline_forward_logits(built.model, built.family.model_inputs(built.settings, dict(batch)))
    ours = ours[..., : built.settings.vocab_size]
    valid = batch["attention_mask"].bool()
    return {"diff": float((ref[valid] - ours[valid]).abs().max()),
            "argmax": bool((ref[valid].argmax(-1) == ours[valid].argmax(-1)).all()),
            "tiles": int(batch["image_grid_hw"].shape[0])}


def test_image_and_video_in_one_row_match_native_classes(nemotron_v2):
    result = run_parallel(_image_and_video_row, 1, str(nemotron_v2))
    assert result["tiles"] == 6 + 1 + 3  # 3 x 2 tiles (4:3 within 6 tiles) + thumbnail, 3 frames
    assert result["diff"] <= TOL and result["argmax"], result


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["vision_config"]["args"].update(model="vit_gigantic_patch14_clip_224", model_kwargs={}),
     "unknown RADIO backbone"),
    (lambda c: c.update(ps_version="v1"), "ps_version 'v1' is not supported"),
    (lambda c: c.pop("llm_config"), "config has no llm_config object"),
    (lambda c: c.pop("img_context_token_id"), "no img_context_token_id"),
], ids=["backbone", "ps-version", "no-llm-config", "no-image-token"])
def test_bad_v2_configs_fail_with_one_line(nemotron_v2, run_cli, capsys, tmp_path, edit, message):
    folder = tmp_path / "edited"
    shutil.copytree(nemotron_v2, folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert run_cli("import", "--hf-model", folder, "--megatron-path", tmp_path / "meg") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "config.json" in err[0], err
    assert not (tmp_path / "meg").exists()
