"""The tiny offline Nemotron-H Omni checkpoint must load and behave like the hub one.

Nemotron parity and conversion tests trust these assets, so this checks that stock
transformers loads them through the Auto classes, that the processor produces the
dynamic-resolution image patches and the tubelet-packed video the model expects (and
the ``<img>``/``<image>``/``</img>`` prompt blocks that go with them), that both safetensors
key layouts (hub names and module names) are what the module docstring says and reload
to the same model, and that the features a Megatron port must reproduce really move the
logits: the chunked Mamba-2 scan and its dt clamp, padding masks, and the CPE position
table interpolation.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub, even by accident

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    NemotronH_Omni_Reasoning_V3,
    NemotronH_Omni_Reasoning_V3ImageProcessor,
    NemotronH_Omni_Reasoning_V3Processor,
    NemotronH_Omni_Reasoning_V3VideoProcessor,
)

from vlm_bridge.testing.checks import saved_shapes  # noqa: E402
from vlm_bridge.testing.media import make_image, make_video_frames  # noqa: E402
from vlm_bridge.testing.tiny_nemotron_vl import (  # noqa: E402
    CHAT_TEMPLATE,
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN_ID,
    PROMPT_IMAGES,
    PROMPT_TEXT,
    PROMPT_VIDEO,
    SPECIAL_TOKEN_IDS,
    TINY_VOCAB_SIZE,
    TOKENIZER_SIZE,
    VIDEO_FPS,
    build_inputs,
    build_tiny_nemotron_vl,
    image_token_count,
)

H = 64  # text hidden size
PATTERN = "M-M*-M*-"
IMAGE_SIZES = [(96, 64), (40, 160)]  # (width, height)
# 96x64 is already 4x6 patches; 40x160 (10 x 2.5 patches) is resized to 10x4 (even sides).
EXPECTED_GRIDS = [[4, 6], [10, 4]]
EXPECTED_IMAGE_TOKENS = [6, 10]
PAD_ID = SPECIAL_TOKEN_IDS["<unk>"]
IMG_START, IMG_END = SPECIAL_TOKEN_IDS["<img>"], SPECIAL_TOKEN_IDS["</img>"]


def _prompt(user: str, system: str = "") -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def _block(count: int) -> str:
    return "<img>" + "<image>" * count + "</img>"


def _images() -> list:
    return [make_image(width, height, seed=i + 1) for i, (width, height) in enumerate(IMAGE_SIZES)]


def _video() -> list:
    # 3 frames: 2 tubelets, the last one padded with a copy of frame 3
    return make_video_frames(3, 72, 48, seed=3)


def _saved_tensor(folder, key: str) -> torch.Tensor:
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            if key in handle.keys():
                return handle.get_tensor(key)
    raise KeyError(key)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _same_weights(model, reference) -> bool:
    expected = reference.state_dict()
    loaded = model.state_dict()
    return loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_nemotron_vl(tmp_path_factory.mktemp("tiny_nemotron"))


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory):
    return build_tiny_nemotron_vl(tmp_path_factory.mktemp("tiny_nemotron_native"), key_format="native")


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder)


@pytest.fixture(scope="module")
def batch(processor):
    return build_inputs(processor, images=_images(), text_only_row=True)


@pytest.fixture(scope="module")
def video_batch(processor):
    return build_inputs(processor, video=_video())


def test_folder_loads_with_auto_classes(folder, model, processor):
    assert type(model) is NemotronH_Omni_Reasoning_V3
    assert model.dtype == torch.float32 and model.config.vision_config.dtype == torch.float32
    assert type(processor) is NemotronH_Omni_Reasoning_V3Processor
    assert type(processor.image_processor) is NemotronH_Omni_Reasoning_V3ImageProcessor
    assert type(processor.video_processor) is NemotronH_Omni_Reasoning_V3VideoProcessor
    assert type(processor.feature_extractor).__name__ == "ParakeetFeatureExtractor"  # required, unused
    assert processor.image_token_id == IMAGE_TOKEN_ID == model.config.image_token_id
    assert (processor.image_start_token, processor.image_end_token) == ("<img>", "</img>")
    assert model.config.audio_config is None and model.audio_tower is None
    assert model.config.video_token_id is None
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= names
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["</s>"]]


def test_chat_template_renders_nemotron_layout(processor):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n<video>\nAnd this?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    plain = [{"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=False) == _prompt("Hi")
    no_think = processor.apply_chat_template(
        plain, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think></think>")
    assert processor.chat_template == processor.tokenizer.chat_template == CHAT_TEMPLATE


def test_processor_expands_images_of_different_sizes(processor, batch):
    assert set(batch.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_grid_hw"}
    assert batch["image_grid_hw"].tolist() == EXPECTED_GRIDS
    assert [image_token_count(w, h) for w, h in IMAGE_SIZES] == EXPECTED_IMAGE_TOKENS
    assert batch["pixel_values"].shape == (4 * 6 + 10 * 4, 3 * 16 * 16)
    assert batch["pixel_values"].dtype == torch.float32
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    # row 0: the two image blocks, <img> + n x <image> + </img>, each followed by "\n"
    user = _block(6) + "\n" + _block(10) + "\n" + PROMPT_IMAGES
    assert processor.tokenizer.decode(ids[0]) == _prompt(user)
    assert (ids[0] == IMAGE_TOKEN_ID).sum() == sum(EXPECTED_IMAGE_TOKENS)
    assert (ids[0] == IMG_START).sum() == 2 and (ids[0] == IMG_END).sum() == 2
    assert mask[0].all()
    # row 1: text only, padded on the left with <unk> (id 0)
    num_pad = int((mask[1] == 0).sum())
    assert num_pad > 0 and not mask[1, :num_pad].any() and mask[1, num_pad:].all()
    assert (ids[1, :num_pad] == PAD_ID).all() and not (ids[1] == IMAGE_TOKEN_ID).any()
    assert processor.tokenizer.decode(ids[1, num_pad:]) == _prompt(PROMPT_TEXT)


def test_pixel_values_are_normalised_channel_major_patches(batch):
    # The 96x64 image is already a 4x6 patch grid, so it is not resized: rebuild its patches.
    image = np.asarray(_images()[0], dtype=np.float32) / 255.0  # [64, 96, 3]
    image = (image - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    patches = image.reshape(4, 16, 6, 16, 3).transpose(0, 2, 4, 1, 3).reshape(24, 3 * 16 * 16)
    torch.testing.assert_close(batch["pixel_values"][:24], torch.from_numpy(patches), rtol=0, atol=1e-5)


def test_video_is_packed_into_tubelets(processor, video_batch):
    assert set(video_batch.keys()) == {"input_ids", "attention_mask", "pixel_values_videos"}
    videos = video_batch["pixel_values_videos"]
    # 72x48 frames -> the 4x6 grid nearest 24 patches (96x64 px); 3 frames -> 2 tubelets
    assert videos.shape == (1, 2, 2 * 3, 64, 96) and videos.dtype == torch.float32
    assert torch.equal(videos[0, 1, :3], videos[0, 1, 3:])  # last tubelet: frame 3 twice
    assert not torch.equal(videos[0, 0, :3], videos[0, 0, 3:])
    user = (
        "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: "
        + _block(6)
        + "\nFrame 3 sampled at 1.00 seconds: "
        + _block(6)
        + "\n"
        + PROMPT_VIDEO
    )
    assert processor.tokenizer.decode(video_batch["input_ids"][0]) == _prompt(user)
    assert VIDEO_FPS == 2.0
    # transformers 5.24: videos only with a single prompt
    texts = [_prompt("<video>\n" + PROMPT_VIDEO), _prompt(PROMPT_TEXT)]
    with pytest.raises(ValueError, match="single prompt"):
        processor(text=texts, videos=[_video()], padding=True, return_tensors="pt")


def test_forward_on_padded_image_and_text_batch(processor, model, batch):
    logits = _logits(model, batch)
    assert logits.shape == (*batch["input_ids"].shape, TINY_VOCAB_SIZE)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # left padding is masked in the attention *and* the Mamba layers: the padded text row
    # gives the logits of the same row alone
    alone = build_inputs(processor, text_only_row=True)
    length = alone["input_ids"].shape[1]
    assert length < batch["input_ids"].shape[1]
    torch.testing.assert_close(logits[1, -length:], _logits(model, alone)[0], rtol=0, atol=1e-5)
    # the images matter
    other = build_inputs(processor, images=[make_image(w, h, seed=9) for w, h in IMAGE_SIZES])
    assert not torch.allclose(_logits(model, other)[0], logits[0])


def test_video_forward_and_no_image_video_mix(processor, model, video_batch):
    logits = _logits(model, video_batch)
    assert logits.shape == (1, video_batch["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    # transformers 5.24: images and videos both scatter into <image> positions, and the image
    # branch counts all of them as its own, so one forward cannot take both.
    text = _prompt("<image>\n<video>\n" + PROMPT_VIDEO)
    mixed = processor(text=[text], images=_images()[:1], videos=[_video()], return_tensors="pt")
    assert {"pixel_values", "pixel_values_videos"} <= set(mixed.keys())
    with pytest.raises(ValueError, match="placeholder tokens"):
        _logits(model, mixed)


def test_seed_determinism(tmp_path, model, batch):
    again = AutoModelForImageTextToText.from_pretrained(build_tiny_nemotron_vl(tmp_path / "same"))
    assert _same_weights(again, model)
    other = AutoModelForImageTextToText.from_pretrained(build_tiny_nemotron_vl(tmp_path / "other", seed=1))
    assert not torch.allclose(_logits(other, batch), _logits(model, batch))


def _expected_keys(native: bool) -> set[str]:
    text = "language_model.model." if native else "language_model.backbone."
    keys = {text + "embeddings.weight", text + "norm_f.weight", "language_model.lm_head.weight"}
    mixers = {
        "M": ["A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "in_proj.weight", "norm.weight"]
        + ["out_proj.weight"],
        "*": ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"],
        "-": ["up_proj.weight", "down_proj.weight"],
    }
    for i, kind in enumerate(PATTERN):
        keys.add(f"{text}layers.{i}.norm.weight")
        keys.update(f"{text}layers.{i}.mixer.{name}" for name in mixers[kind])
    if native:
        vision = "vision_model.embeddings."
        keys.update(vision + name for name in ("cls_register_token", "position_embedding"))
        keys.update(vision + f"{name}.weight" for name in ("patch_projection", "video_patch_projection"))
        keys.add("vision_model.summary_idxs")
        block_names = [f"attention.{p}_proj" for p in "qkvo"] + ["norm1", "norm2", "mlp.fc1", "mlp.fc2"]
        block_params = ["layer_scale1.lambda1", "layer_scale2.lambda1"]
        block = "vision_model.encoder.layer.{}."
        keys.update(f"multi_modal_projector.{name}.weight" for name in ("layer_norm", "linear_1", "linear_2"))
    else:
        vision = "vision_model.radio_model.model.patch_generator."
        keys.update(vision + name for name in ("cls_token.token", "pos_embed"))
        keys.update(vision + f"{name}.weight" for name in ("embedder", "video_embedder"))
        keys.add("vision_model.radio_model.summary_idxs")
        block_names = ["attn.qkv", "attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"]
        block_params = []
        block = "vision_model.radio_model.model.blocks.{}."
        keys.update(f"mlp1.{index}.weight" for index in (0, 1, 3))
    for j in range(2):
        prefix = block.format(j)
        keys.update(prefix + f"{name}.{kind}" for name in block_names for kind in ("weight", "bias"))
        keys.update(prefix + name for name in block_params)
    return keys


def test_default_format_uses_hub_names(folder):
    shapes = saved_shapes(folder)
    assert set(shapes) == _expected_keys(native=False)
    text, radio = "language_model.backbone.", "vision_model.radio_model."
    expected = {
        text + "embeddings.weight": [TINY_VOCAB_SIZE, H],
        "language_model.lm_head.weight": [TINY_VOCAB_SIZE, H],
        # z 64 | x 64, B 2x16, C 2x16 | dt 8
        text + "layers.0.mixer.in_proj.weight": [64 + 128 + 8, H],
        text + "layers.0.mixer.conv1d.weight": [128, 1, 4],
        text + "layers.0.mixer.A_log": [8],
        text + "layers.0.mixer.norm.weight": [64],
        text + "layers.0.mixer.out_proj.weight": [H, 64],
        text + "layers.1.mixer.up_proj.weight": [96, H],
        text + "layers.3.mixer.k_proj.weight": [2 * 16, H],
        radio + "model.patch_generator.embedder.weight": [32, 3 * 16 * 16],
        radio + "model.patch_generator.video_embedder.weight": [32, 2 * 3 * 16 * 16],
        radio + "model.patch_generator.pos_embed": [1, 8 * 8, 32],
        radio + "model.patch_generator.cls_token.token": [2 + 3, 32],
        radio + "model.blocks.0.attn.qkv.weight": [3 * 32, 32],
        radio + "model.blocks.1.mlp.fc1.weight": [64, 32],
        radio + "summary_idxs": [2],
        "mlp1.0.weight": [4 * 32],
        "mlp1.1.weight": [48, 4 * 32],
        "mlp1.3.weight": [H, 48],
    }
    assert {key: shapes[key] for key in expected} == expected
    assert _saved_tensor(folder, radio + "summary_idxs").dtype == torch.int64


def test_native_format_uses_module_names_and_both_reload_alike(folder, native_folder, model):
    shapes = saved_shapes(native_folder)
    assert set(shapes) == _expected_keys(native=True)
    assert shapes["vision_model.encoder.layer.0.attention.q_proj.weight"] == [32, 32]
    assert shapes["multi_modal_projector.linear_1.weight"] == [48, 4 * 32]
    # hub qkv = q | k | v stacked on rows
    qkv = _saved_tensor(folder, "vision_model.radio_model.model.blocks.1.attn.qkv.weight")
    native = [
        _saved_tensor(native_folder, f"vision_model.encoder.layer.1.attention.{p}_proj.weight") for p in "qkv"
    ]
    assert torch.equal(qkv, torch.cat(native))
    reloaded = AutoModelForImageTextToText.from_pretrained(native_folder)
    assert type(reloaded) is NemotronH_Omni_Reasoning_V3 and _same_weights(reloaded, model)
    # the default format leaves out RADIO's identity LayerScale; it loads as 1.0
    assert (model.vision_model.encoder.layer[0].layer_scale1.lambda1 == 1).all()
    assert not any(hasattr(module, "norm_mean") for module in model.vision_model.modules())


def test_sharded_default_checkpoint_loads_the_same_weights(tmp_path, model):
    folder = build_tiny_nemotron_vl(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(saved_shapes(folder)) == _expected_keys(native=False)
    assert _same_weights(AutoModelForImageTextToText.from_pretrained(folder), model)


def _mamba_mixers(model):
    layers = model.language_model.model.layers
    return [layer.mixer for layer in layers if layer.block_type == "linear_attention"]


def test_text_config_exercises_nemotron_h_features(model, batch):
    text = model.config.text_config
    assert text.hybrid_override_pattern == PATTERN and len(text.layers_block_type) == 8
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4, 2, 16)
    assert (text.mamba_num_heads, text.mamba_head_dim, text.n_groups, text.ssm_state_size) == (8, 8, 2, 16)
    assert text.expand * text.hidden_size != text.mamba_num_heads * text.mamba_head_dim
    assert text.mlp_hidden_act == "relu2" and text.layer_norm_epsilon == 1e-5
    assert text.vocab_size == TINY_VOCAB_SIZE and text.vocab_size % 128 != 0
    assert text.chunk_size * 3 < batch["input_ids"].shape[1]  # the scan crosses chunks
    assert not any("rotary" in name for name, _ in model.named_modules())  # no positional encoding
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.model.embeddings.weight.data_ptr()
    assert not torch.equal(lm.lm_head.weight, lm.model.embeddings.weight)
    for mixer in _mamba_mixers(model):
        heads = torch.arange(1, 9, dtype=torch.float32)
        assert not torch.allclose(mixer.A_log, heads.log())
        assert not torch.allclose(mixer.D, torch.ones(8))
        assert not torch.allclose(mixer.norm.weight, torch.ones(64))
        assert mixer.norm.group_size == 32
    for name, param in model.named_parameters():
        if param.ndim == 1 and "norm" in name and "weight" in name:
            assert not torch.allclose(param, torch.ones_like(param)), name


def test_dt_clamp_is_active_and_matters(folder, model, batch):
    seen: list[torch.Tensor] = []
    hooks = []
    for mixer in _mamba_mixers(model):

        def record(module, inputs, output, mixer=mixer):
            raw = output[..., -mixer.num_heads :] + mixer.dt_bias
            seen.append(torch.nn.functional.softplus(raw)[batch["attention_mask"].bool()])

        hooks.append(mixer.in_proj.register_forward_hook(record))
    try:
        logits = _logits(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    dt = torch.cat([values.flatten() for values in seen])
    time_step_min = model.config.text_config.time_step_min
    assert 0.2 < (dt < time_step_min).float().mean() < 0.8
    config = AutoConfig.from_pretrained(folder)
    config.text_config.time_step_min = 0.0
    unclamped = AutoModelForImageTextToText.from_pretrained(folder, config=config)
    assert (logits - _logits(unclamped, batch)).abs().max() > 0.1


def test_vision_tower_interpolates_the_position_table(model):
    vision = model.config.vision_config
    embeddings = model.vision_model.embeddings
    assert (embeddings.max_rows, embeddings.max_cols) == (8, 8)
    assert vision.num_cls_tokens + vision.num_registers == 5
    assert embeddings.cls_register_token.shape == (5, 32)
    assert embeddings.video_patch_projection.weight.shape == (32, 2 * 3 * 16 * 16)
    assert isinstance(model.vision_model.input_conditioner, torch.nn.Identity)  # processors normalise
    assert model.vision_final_layernorm is None
    table = embeddings.position_embedding.reshape(8, 8, -1)
    with torch.no_grad():
        small = embeddings._interpolate_position_embedding((4, 6), torch.float32)[0]
        tall = embeddings._interpolate_position_embedding((10, 4), torch.float32)[0]
    assert small.shape == (24, 32) and tall.shape == (40, 32)
    # a 4x6 grid is resized to 6x6 and then cropped: not a crop of the 8x8 table
    assert not torch.allclose(small, table[:4, :6].reshape(24, -1))
    assert (model.config.downsample_ratio, model.config.projector_hidden_size) == (0.5, 48)
    assert model.multi_modal_projector.linear_1.bias is None


def test_tokenizer_round_trips_special_tokens(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == TOKENIZER_SIZE < TINY_VOCAB_SIZE
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
        assert tokenizer.convert_ids_to_tokens(token_id) == token
        assert tokenizer.decode([token_id]) == token
    expected_ids = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 10, "<|im_end|>": 11}
    expected_ids |= {"<think>": 12, "</think>": 13, "<image>": 18, "<img>": 19, "</img>": 20}
    assert {token: SPECIAL_TOKEN_IDS[token] for token in expected_ids} == expected_ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "<|im_end|>", "<unk>")
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert (tokenizer.image_token, tokenizer.image_start_token, tokenizer.image_end_token) == (
        "<image>",
        "<img>",
        "</img>",
    )
    assert tokenizer("Hi").input_ids[0] != SPECIAL_TOKEN_IDS["<s>"]  # no bos added
    assert len(tokenizer.encode("<video>", add_special_tokens=False)) > 1  # not a token, as on the hub
    text = "Frame 1 sampled at 0.00 seconds: 😀\n"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text  # byte-level


def test_tokenizer_without_pad_token(tmp_path):
    folder = build_tiny_nemotron_vl(tmp_path / "nopad", pad_token=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    assert len(tokenizer) == TOKENIZER_SIZE
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.tokenizer.pad_token is None
    single = build_inputs(processor, images=_images())
    assert single["image_grid_hw"].tolist() == EXPECTED_GRIDS
    with pytest.raises(ValueError, match="pad"):
        build_inputs(processor, images=_images(), text_only_row=True)


def test_moe_variant_in_both_formats(tmp_path, batch):
    default = build_tiny_nemotron_vl(tmp_path / "moe", moe=True)
    native = build_tiny_nemotron_vl(tmp_path / "moe_native", moe=True, key_format="native")
    shapes, native_shapes = saved_shapes(default), saved_shapes(native)
    layer = "language_model.backbone.layers.1.mixer."
    assert shapes[layer + "experts.3.up_proj.weight"] == [32, H]  # one tensor per expert
    assert shapes[layer + "experts.3.down_proj.weight"] == [H, 32]
    assert shapes[layer + "gate.weight"] == [4, H] and shapes[layer + "gate.e_score_correction_bias"] == [4]
    assert shapes[layer + "shared_experts.up_proj.weight"] == [48, H]
    native_layer = "language_model.model.layers.1.mixer."
    assert native_shapes[native_layer + "experts.up_proj"] == [4, 32, H]  # fused [E, out, in]
    assert native_shapes[native_layer + "experts.down_proj"] == [4, H, 32]
    model = AutoModelForImageTextToText.from_pretrained(default)
    assert model.config.text_config.hybrid_override_pattern == "MEM*EM*E"
    assert _same_weights(AutoModelForImageTextToText.from_pretrained(native), model)
    gate = model.language_model.model.layers[1].mixer.gate
    assert gate.e_score_correction_bias.abs().min() > 0 and gate.weight.dtype == torch.float32
    assert torch.isfinite(_logits(model, batch)).all()


def test_vision_final_layernorm_variant(tmp_path, batch):
    folder = build_tiny_nemotron_vl(tmp_path / "vfl", vision_final_layernorm=True)
    shapes = saved_shapes(folder)
    assert shapes["vision_projector.vision_final_layernorm.weight"] == [32]
    assert shapes["vision_projector.vision_final_layernorm.bias"] == [32]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.text_config.num_nextn_predict_layers == 1
    assert isinstance(model.vision_final_layernorm, torch.nn.LayerNorm)
    assert torch.isfinite(_logits(model, batch)).all()


def test_bfloat16_build(tmp_path, batch):
    folder = build_tiny_nemotron_vl(tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["vision_config"]["dtype"] == "bfloat16"
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    logits = _logits(model, batch)  # pixel values are cast to vision_config.dtype
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
