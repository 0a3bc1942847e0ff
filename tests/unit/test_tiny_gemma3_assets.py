"""The tiny offline Gemma 3 checkpoint must look and behave like google/gemma-3-4b-it.

Gemma 3 parity tests trust these assets, so this checks that stock transformers
loads them through the Auto classes, that the chat template and the processor
produce Gemma's prompt layout (one ``<bos>``, image blocks of soft tokens marked
in ``token_type_ids``), and that the features a Megatron port must reproduce are
really exercised: local layers whose window is shorter than the prompt,
bidirectional attention inside image blocks, pan-and-scan crops, and weights
whose Gemma-specific parts (``1 + w`` norms, projector) are not at their init.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub, even by accident

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
)

from vlm_bridge.testing.checks import saved_shapes  # noqa: E402
from vlm_bridge.testing.media import make_image  # noqa: E402
from vlm_bridge.testing.tiny_gemma3_vl import (  # noqa: E402
    BOI_TOKEN_ID,
    EOI_TOKEN_ID,
    IMAGE_TOKEN_ID,
    MM_TOKENS_PER_IMAGE,
    PAN_AND_SCAN_KWARGS,
    SPECIAL_TOKEN_IDS,
    TINY_VOCAB_SIZE,
    TOKENIZER_SIZE,
    build_tiny_gemma3_vl,
    make_tiny_gemma3_processor,
    use_saved_pan_and_scan,
)

SYSTEM = "You are a helpful assistant."
PROMPT = "Compare the two pictures."
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]},
]
# google/gemma-3-4b-it renders CONVERSATION exactly like this: the system text folded into
# the first user turn, a bare <start_of_image> per image, "model" as the assistant role.
EXPECTED_PROMPT = (
    f"<bos><start_of_turn>user\n{SYSTEM}\n\n<start_of_image><start_of_image>{PROMPT}<end_of_turn>\n"
    "<start_of_turn>model\n"
)
H = 64  # text hidden size


def _images() -> list:
    # Neither is square: the processor resizes both to 56x56 (no aspect-ratio handling).
    return [make_image(56, 84, seed=1), make_image(112, 56, seed=2)]


def _encode(processor, images, conversation=CONVERSATION):
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # The template already starts with <bos>; the tokenizer would add a second one.
    return processor(text=text, images=images, add_special_tokens=False, return_tensors="pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_gemma3_vl(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def batch(processor):
    return _encode(processor, _images())


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_folder_loads_with_auto_classes(model, processor):
    assert type(model) is Gemma3ForConditionalGeneration
    assert type(processor) is Gemma3Processor
    assert type(processor.image_processor) is Gemma3ImageProcessor  # the torchvision ("fast") one
    tokenizer = processor.tokenizer
    assert type(tokenizer) is GemmaTokenizer and tokenizer.is_fast
    # GemmaTokenizer pads on the left by default (class attribute); <pad> is id 0, as on the hub.
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<pad>", 0, "left")
    assert processor.image_seq_length == MM_TOKENS_PER_IMAGE == model.config.mm_tokens_per_image
    assert processor.image_processor.do_pan_and_scan is False


def test_chat_template_renders_gemma_layout(processor):
    text = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text == EXPECTED_PROMPT
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello "},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    assert processor.apply_chat_template(turns, tokenize=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )


def test_processor_expands_each_image_into_a_soft_token_block(processor, batch):
    ids, types = batch["input_ids"][0], batch["token_type_ids"][0]
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    assert (ids == SPECIAL_TOKEN_IDS["<bos>"]).sum() == 1 and ids[0] == SPECIAL_TOKEN_IDS["<bos>"]
    # token_type_ids mark exactly the soft tokens (not <start_of_image> / <end_of_image>)
    assert torch.equal(types == 1, ids == IMAGE_TOKEN_ID) and set(types.tolist()) == {0, 1}
    assert (ids == IMAGE_TOKEN_ID).sum() == 2 * MM_TOKENS_PER_IMAGE
    decoded = processor.tokenizer.decode(ids)
    block = "\n\n<start_of_image>" + "<image_soft_token>" * MM_TOKENS_PER_IMAGE + "<end_of_image>\n\n"
    assert decoded == EXPECTED_PROMPT.replace("<start_of_image>", block)
    # per image: "\n\n", boi, 4 soft tokens, eoi, "\n\n" = 8 ids
    start = ids.tolist().index(BOI_TOKEN_ID)
    newlines = processor.tokenizer.convert_tokens_to_ids("\n\n")
    assert ids[start - 1 : start + 7].tolist() == [
        newlines,
        BOI_TOKEN_ID,
        *[IMAGE_TOKEN_ID] * MM_TOKENS_PER_IMAGE,
        EOI_TOKEN_ID,
        newlines,
    ]


def test_forward_shape_and_seed_determinism(tmp_path, model, batch):
    logits = _logits(model, batch)
    assert logits.shape == (1, batch["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    again = AutoModelForImageTextToText.from_pretrained(build_tiny_gemma3_vl(tmp_path / "same"))
    assert torch.equal(_logits(again, batch), logits)
    other = AutoModelForImageTextToText.from_pretrained(build_tiny_gemma3_vl(tmp_path / "other", seed=1))
    assert not torch.allclose(_logits(other, batch), logits)


def test_sliding_window_is_shorter_than_the_prompt_and_matters(folder, model, batch):
    text = model.config.text_config
    assert text.layer_types.count("sliding_attention") == 4 and text.layer_types.count("full_attention") == 2
    window, length = text.sliding_window, batch["input_ids"].shape[1]
    assert window < length
    config = AutoConfig.from_pretrained(folder)
    config.text_config.sliding_window = 4096
    unwindowed = AutoModelForImageTextToText.from_pretrained(folder, config=config)
    logits, wide = _logits(model, batch), _logits(unwindowed, batch)
    # the same while every key is inside the window, different once keys fall out of it
    torch.testing.assert_close(logits[:, :window], wide[:, :window], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, window:], wide[:, window:])


def test_image_blocks_attend_bidirectionally(model, batch):
    causal_only = {key: value for key, value in batch.items() if key != "token_type_ids"}
    logits, causal = _logits(model, batch), _logits(model, causal_only)
    first_image = int(batch["token_type_ids"][0].nonzero()[0])
    # without token_type_ids sdpa may take its is_causal path: equal up to rounding
    torch.testing.assert_close(logits[:, :first_image], causal[:, :first_image], rtol=0, atol=1e-6)
    image_rows = batch["token_type_ids"][0] == 1
    assert not torch.allclose(logits[0, image_rows], causal[0, image_rows])


def test_config_exercises_gemma_features(model):
    config, text, vision = model.config, model.config.text_config, model.config.vision_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.head_dim == 24 != text.hidden_size // text.num_attention_heads
    assert text.query_pre_attn_scalar == 20 != text.head_dim
    assert text.final_logit_softcapping is None and text.attn_logit_softcapping is None
    expected_rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    }
    assert text.rope_parameters == expected_rope
    # The hub's legacy fields convert to the same per-layer-type dict.
    legacy_rope = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}
    legacy = Gemma3TextConfig(**legacy_rope, rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert legacy.rope_parameters == expected_rope
    assert text.to_dict()["sliding_window_pattern"] == 3  # consistent with layer_types
    assert vision.vision_use_head is False and vision.image_size // vision.patch_size == 4
    assert model.model.multi_modal_projector.kernel_size == 2  # 4x4 patches -> 2x2 soft tokens
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (
        BOI_TOKEN_ID,
        EOI_TOKEN_ID,
        IMAGE_TOKEN_ID,
    )
    assert config.eos_token_id == [SPECIAL_TOKEN_IDS["<eos>"], SPECIAL_TOKEN_IDS["<end_of_turn>"]]
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (2, 1, 0)


def test_tokenizer_round_trips_special_tokens(folder, processor):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == TOKENIZER_SIZE < TINY_VOCAB_SIZE  # spare embedding rows, as on the hub
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
        assert tokenizer.convert_ids_to_tokens(token_id) == token
        assert tokenizer.decode([token_id]) == token
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<bos>", "<eos>", "<unk>")
    assert tokenizer("Hi").input_ids[0] == SPECIAL_TOKEN_IDS["<bos>"]  # add_bos_token, as on the hub
    assert (tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id) == (
        BOI_TOKEN_ID,
        EOI_TOKEN_ID,
        IMAGE_TOKEN_ID,
    )
    # Gemma3Processor calls <start_of_image> its "image token": not the id the model scatters into.
    assert processor.image_token_id == BOI_TOKEN_ID != IMAGE_TOKEN_ID
    text = "Here is a 😀\n\n"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text  # byte fallback


def test_pan_and_scan_adds_crops(tmp_path):
    images = [make_image(168, 56, seed=3), make_image(56, 56, seed=4)]  # aspect 3 -> 3 crops; square -> none
    folder = build_tiny_gemma3_vl(tmp_path / "pas", pan_and_scan=True)
    loaded = AutoProcessor.from_pretrained(folder)
    assert loaded.image_processor.do_pan_and_scan is True
    # transformers 5.24: Gemma3Processor's class-level images_kwargs override the saved setting
    assert _encode(loaded, images)["pixel_values"].shape[0] == len(images)
    text = loaded.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    in_memory = make_tiny_gemma3_processor(pan_and_scan=True)
    batches = [
        _encode(in_memory, images),
        loaded(
            text=text, images=images, add_special_tokens=False, return_tensors="pt", **PAN_AND_SCAN_KWARGS
        ),
        _encode(use_saved_pan_and_scan(loaded), images),  # last: it changes `loaded`
    ]
    for batch in batches:
        assert batch["pixel_values"].shape == (5, 3, 56, 56)  # thumbnail + 3 crops, then the square one
        assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum() == 5 * MM_TOKENS_PER_IMAGE
        assert torch.equal(batch["token_type_ids"] == 1, batch["input_ids"] == IMAGE_TOKEN_ID)
        assert torch.equal(batch["input_ids"], batches[0]["input_ids"])
    assert "here are some crops" in in_memory.tokenizer.decode(batches[0]["input_ids"][0])
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert _logits(model, batches[0]).shape == (1, batches[0]["input_ids"].shape[1], TINY_VOCAB_SIZE)


def test_saved_weights_layout_and_init(folder, model):
    shapes = saved_shapes(folder)
    layer = "language_model.model.layers.0."
    expected = {
        "language_model.model.embed_tokens.weight": [TINY_VOCAB_SIZE, H],
        layer + "self_attn.q_proj.weight": [4 * 24, H],
        layer + "self_attn.k_proj.weight": [2 * 24, H],
        layer + "self_attn.o_proj.weight": [H, 4 * 24],
        layer + "self_attn.q_norm.weight": [24],
        layer + "pre_feedforward_layernorm.weight": [H],
        layer + "post_feedforward_layernorm.weight": [H],
        layer + "mlp.gate_proj.weight": [96, H],
        # save_pretrained drops the hub's "vision_model." level (vision_tower.vision_model.*)
        "vision_tower.embeddings.patch_embedding.weight": [32, 3, 14, 14],
        "vision_tower.embeddings.position_embedding.weight": [16, 32],
        "vision_tower.encoder.layers.1.self_attn.q_proj.bias": [32],
        "vision_tower.post_layernorm.weight": [32],
        # [vision, text]: used as x @ W, not as an nn.Linear weight
        "multi_modal_projector.mm_input_projection_weight": [32, H],
        "multi_modal_projector.mm_soft_emb_norm.weight": [32],
    }
    assert {key: shapes.get(key) for key in expected} == expected
    assert not any("lm_head" in key or "vision_model" in key for key in shapes)  # tied; see above
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    params = dict(model.named_parameters())
    for name in (
        "model.language_model.layers.0.input_layernorm.weight",
        "model.language_model.layers.0.self_attn.k_norm.weight",
        "model.language_model.norm.weight",
        "model.multi_modal_projector.mm_soft_emb_norm.weight",
    ):
        weight = params[name]  # Gemma RMSNorm scales by 1 + w: zero-mean random w
        assert weight.abs().min() > 0 and weight.mean().abs() < 0.2, name
    assert params["model.multi_modal_projector.mm_input_projection_weight"].abs().min() > 0
    assert params["model.vision_tower.encoder.layers.0.mlp.fc1.bias"].abs().sum() > 0
    # <pad> is padding_idx (zeroed at init): re-drawn so its tied logit is not a constant 0
    assert params["model.language_model.embed_tokens.weight"][0].abs().min() > 0


def test_hub_key_layout_loads_too(tmp_path, folder, model):
    # Hub Gemma 3 files name the tower vision_tower.vision_model.*; 5.24 strips that on load.
    hub = build_tiny_gemma3_vl(tmp_path / "hub")
    tensors = load_file(str(hub / "model.safetensors"))
    renamed = {
        key.replace("vision_tower.", "vision_tower.vision_model.", 1): value for key, value in tensors.items()
    }
    save_file(renamed, str(hub / "model.safetensors"), metadata={"format": "pt"})
    reloaded = AutoModelForImageTextToText.from_pretrained(hub)
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in reloaded.state_dict().items())


def test_untied_variant_writes_lm_head(tmp_path):
    folder = build_tiny_gemma3_vl(tmp_path / "untied", tie_word_embeddings=False)
    assert saved_shapes(folder)["language_model.lm_head.weight"] == [TINY_VOCAB_SIZE, H]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, model):
    folder = build_tiny_gemma3_vl(tmp_path / "sharded", max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 1
    expected = model.state_dict()
    loaded = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.items())
