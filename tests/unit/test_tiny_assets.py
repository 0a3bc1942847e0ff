"""The tiny offline Qwen2.5-VL checkpoint must look and behave like a hub one.

Everything downstream (conversion, parity, CLI demo) trusts these assets, so
this checks that stock transformers loads them, that the processor expands
image/video placeholders as the grids imply, and that the saved weights use
the hub key layout.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub, even by accident

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.vision_utils import get_vision_window_index  # noqa: E402

from vlm_bridge.testing.checks import saved_shapes  # noqa: E402
from vlm_bridge.testing.media import (  # noqa: E402
    frames_to_array,
    load_video_frames,
    make_image,
    make_video_frames,
    save_video_frames,
)
from vlm_bridge.testing.tiny_qwen2_5_vl import (  # noqa: E402
    SPECIAL_TOKEN_IDS,
    TINY_VOCAB_SIZE,
    build_inputs,
    build_tiny_qwen2_5_vl,
)

HUB_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "visual.", "lm_head.")
MERGE_UNIT = 4  # spatial_merge_size ** 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def batch(processor):
    images = [make_image(56, 84, seed=1), make_image(112, 56, seed=2)]
    video = make_video_frames(4, 56, 56, seed=3)
    return build_inputs(processor, images=images, video=video, text_only_row=True)


def test_forward_on_mixed_batch(tiny_dir, batch):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, TINY_VOCAB_SIZE)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_placeholders_match_grids(batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_pad, video_pad = SPECIAL_TOKEN_IDS["<|image_pad|>"], SPECIAL_TOKEN_IDS["<|video_pad|>"]
    expected_image = int(batch["image_grid_thw"].prod(dim=-1).sum()) // MERGE_UNIT
    assert batch["image_grid_thw"].shape[0] == 2
    assert (ids[0] == image_pad).sum().item() == expected_image
    expected_video = int(batch["video_grid_thw"].prod(dim=-1).sum()) // MERGE_UNIT
    assert expected_video > 0 and (ids[1] == video_pad).sum().item() == expected_video
    assert not torch.isin(ids[2], torch.tensor([image_pad, video_pad])).any()
    assert batch["second_per_grid_ts"].tolist() == [1.0]
    # left padding: rows differ in length, and every row ends with a real token
    assert len(set(mask.sum(dim=1).tolist())) > 1 and bool(mask[:, -1].all())


def test_window_attention_partitions_images(batch):
    _, cu_window_seqlens = get_vision_window_index(batch["image_grid_thw"], 2, 56, 14)
    non_empty_windows = int((torch.diff(torch.as_tensor(cu_window_seqlens)) > 0).sum())
    assert non_empty_windows >= 4  # at least two windows per image


def test_token_ids_agree_between_config_and_tokenizer(tiny_dir):
    model_config = Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tokenizer) == model_config.text_config.vocab_size == TINY_VOCAB_SIZE
    assert TINY_VOCAB_SIZE % 128 != 0
    assert model_config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model_config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert model_config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model_config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert sum(model_config.text_config.rope_parameters["mrope_section"]) * 2 == 64 // 4


def test_saved_keys_use_hub_layout(tiny_dir):
    keys = set(saved_shapes(tiny_dir))
    assert all(key.startswith(HUB_PREFIXES) for key in keys), sorted(keys)
    for prefix in HUB_PREFIXES:
        assert any(key.startswith(prefix) for key in keys), prefix


def test_tied_embeddings_drop_lm_head(tmp_path):
    folder = build_tiny_qwen2_5_vl(
        tmp_path / "tied", tie_word_embeddings=True, max_shard_size="200KB"
    )
    keys = set(saved_shapes(folder))
    assert (folder / "model.safetensors.index.json").exists()
    assert "model.embed_tokens.weight" in keys
    assert not any(key.startswith("lm_head") for key in keys)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    assert (
        model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    )


def test_media_is_deterministic(tmp_path):
    assert make_image(56, 84, seed=5).tobytes() == make_image(56, 84, seed=5).tobytes()
    assert make_image(56, 84, seed=5).tobytes() != make_image(56, 84, seed=6).tobytes()
    frames = make_video_frames(4, 56, 56, seed=3)
    assert frames[0].tobytes() != frames[-1].tobytes()
    assert frames_to_array(frames).shape == (4, 56, 56, 3)
    save_video_frames(frames, tmp_path)
    loaded = load_video_frames(tmp_path)
    assert [f.tobytes() for f in loaded] == [f.tobytes() for f in frames]
