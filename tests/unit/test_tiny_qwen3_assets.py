"""The tiny offline Qwen3-VL / Qwen3-VL-MoE checkpoints must look and behave like hub ones.

Stock transformers must load them through the Auto classes, the shared
``vlm_bridge.verify.build_batch`` must give a batch the model accepts (two
images of different sizes, a video, a text-only row), and the saved weights
must use the layout ``save_pretrained`` writes, which converters rely on.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub, even by accident

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer  # noqa: E402

from vlm_bridge.testing.checks import saved_shapes  # noqa: E402
from vlm_bridge.testing.media import make_image, make_video_frames  # noqa: E402
from vlm_bridge.testing.tiny_qwen3_vl import (  # noqa: E402
    SPECIAL_TOKEN_IDS,
    TINY_VOCAB_SIZE,
    build_tiny_qwen3_vl,
    make_tiny_qwen3_model,
    tiny_qwen3_vl_config,
)
from vlm_bridge.verify import build_batch  # noqa: E402

PREFIXES = ("model.language_model.", "model.visual.", "lm_head.")
LEARNED_GRID = 8  # sqrt(num_position_embeddings)
MERGE_UNIT = 4  # spatial_merge_size ** 2
H, V = 64, 32  # text and vision hidden sizes

LM_ATTENTION = {
    "input_layernorm.weight": [H],
    "post_attention_layernorm.weight": [H],
    "self_attn.q_proj.weight": [64, H],
    "self_attn.k_proj.weight": [32, H],
    "self_attn.v_proj.weight": [32, H],
    "self_attn.o_proj.weight": [H, 64],
    "self_attn.q_norm.weight": [16],
    "self_attn.k_norm.weight": [16],
}
DENSE_MLP = {
    "mlp.gate_proj.weight": [128, H],
    "mlp.up_proj.weight": [128, H],
    "mlp.down_proj.weight": [H, 128],
}
# Fused experts, in-memory layout (as save_pretrained writes it): [E, 2*I, H] and [E, H, I].
MOE_MLP = {
    "mlp.gate.weight": [4, H],
    "mlp.experts.gate_up_proj": [4, 48, H],
    "mlp.experts.down_proj": [4, H, 24],
}
VISION_BLOCK = {
    "norm1.weight": [V],
    "norm1.bias": [V],
    "norm2.weight": [V],
    "norm2.bias": [V],
    "attn.qkv.weight": [3 * V, V],
    "attn.qkv.bias": [3 * V],
    "attn.proj.weight": [V, V],
    "attn.proj.bias": [V],
    "mlp.linear_fc1.weight": [64, V],
    "mlp.linear_fc1.bias": [64],
    "mlp.linear_fc2.weight": [V, 64],
    "mlp.linear_fc2.bias": [V],
}


def _merger(norm_width: int) -> dict[str, list[int]]:
    merged = V * MERGE_UNIT
    return {
        "norm.weight": [norm_width],
        "norm.bias": [norm_width],
        "linear_fc1.weight": [merged, merged],
        "linear_fc1.bias": [merged],
        "linear_fc2.weight": [H, merged],
        "linear_fc2.bias": [H],
    }


def _with_prefix(prefix: str, entries: dict[str, list[int]]) -> dict[str, list[int]]:
    return {prefix + key: shape for key, shape in entries.items()}


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def variant(request, tmp_path_factory):
    moe = request.param
    folder = build_tiny_qwen3_vl(tmp_path_factory.mktemp("moe" if moe else "dense"), moe=moe)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    images = [make_image(64, 96, seed=1), make_image(128, 64, seed=2)]
    batch = build_batch(processor, images, make_video_frames(4, 64, 64, seed=3), "Describe.")
    return moe, folder, processor, model, batch


def test_forward_on_mixed_batch(variant):
    moe, _, _, model, batch = variant
    assert type(model).__name__ == (
        "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    )
    assert "mm_token_type_ids" in batch  # the model refuses media without it
    with torch.no_grad():
        out = model(**batch, output_router_logits=moe)
    assert out.logits.shape == (3, batch["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()
    if moe:  # every expert is picked somewhere in every layer: routing is not degenerate
        assert len(out.router_logits) == 4
        for logits in out.router_logits:
            picked = logits.topk(2, dim=-1).indices.unique()
            assert picked.tolist() == [0, 1, 2, 3]


def test_grids_and_placeholders(variant):
    _, _, _, _, batch = variant
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    grids = batch["image_grid_thw"]
    assert grids.tolist() == [[1, 6, 4], [1, 4, 8]]
    # at least one image grid differs from the learned 8x8 one: pos-embed interpolation runs
    assert any(tuple(g[1:].tolist()) != (LEARNED_GRID, LEARNED_GRID) for g in grids)
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    image_pad, video_pad = SPECIAL_TOKEN_IDS["<|image_pad|>"], SPECIAL_TOKEN_IDS["<|video_pad|>"]
    assert (ids[0] == image_pad).sum().item() == int(grids.prod(-1).sum()) // MERGE_UNIT
    assert (ids[1] == video_pad).sum().item() == 2 * 16 // MERGE_UNIT
    assert torch.equal(types == 1, ids == image_pad) and torch.equal(types == 2, ids == video_pad)
    assert not torch.isin(ids[2], torch.tensor([image_pad, video_pad])).any()


def test_video_row_has_timestamps(variant):
    _, _, processor, _, batch = variant
    row = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    text = processor.tokenizer.decode(row)
    # one "<t seconds>" + vision_start ... vision_end per temporal group, inside the
    # template's own outer vision_start ... vision_end pair
    assert "<|vision_start|><0.2 seconds><|vision_start|>" in text
    assert "<|vision_end|><1.2 seconds><|vision_start|>" in text
    assert text.count("<|vision_start|>") == 3 and text.count("<|vision_end|>") == 3


def test_saved_keys_use_save_pretrained_layout(variant):
    moe, folder, _, _, _ = variant
    shapes = saved_shapes(folder)
    assert all(key.startswith(PREFIXES) for key in shapes), sorted(shapes)
    layer = "model.language_model.layers.1."
    expected = {
        "lm_head.weight": [TINY_VOCAB_SIZE, H],
        "model.language_model.embed_tokens.weight": [TINY_VOCAB_SIZE, H],
        "model.language_model.norm.weight": [H],
        **_with_prefix(layer, LM_ATTENTION),
        **_with_prefix(layer, MOE_MLP if moe else DENSE_MLP),
        "model.visual.patch_embed.proj.weight": [V, 3, 2, 16, 16],
        "model.visual.patch_embed.proj.bias": [V],
        "model.visual.pos_embed.weight": [LEARNED_GRID**2, V],
        **_with_prefix("model.visual.blocks.0.", VISION_BLOCK),
        **_with_prefix("model.visual.merger.", _merger(V)),
        **_with_prefix("model.visual.deepstack_merger_list.0.", _merger(V * MERGE_UNIT)),
        **_with_prefix("model.visual.deepstack_merger_list.1.", _merger(V * MERGE_UNIT)),
    }
    assert {key: shapes.get(key) for key in expected} == expected
    layer_keys = {key[len(layer) :] for key in shapes if key.startswith(layer)}
    assert layer_keys == set(LM_ATTENTION) | set(MOE_MLP if moe else DENSE_MLP)
    assert not any("deepstack_merger_list.2." in key for key in shapes)
    assert sum(key.startswith("model.language_model.layers.") for key in shapes) == 4 * len(layer_keys)


def test_weights_round_trip_and_are_perturbed(variant):
    moe, _, _, model, _ = variant
    reference = make_tiny_qwen3_model(tiny_qwen3_vl_config(moe=moe))
    loaded = model.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in reference.state_dict().items())
    for name in (
        "model.language_model.layers.0.self_attn.q_norm.weight",
        "model.language_model.layers.0.self_attn.k_norm.weight",
        "model.visual.deepstack_merger_list.0.norm.weight",
    ):
        assert not torch.equal(loaded[name], torch.ones_like(loaded[name])), name
    assert loaded["model.visual.blocks.0.attn.qkv.bias"].abs().sum() > 0


def test_config_and_token_ids(variant):
    moe, folder, _, model, _ = variant
    config = model.config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text, vision = config.text_config, config.vision_config
    assert len(tokenizer) == text.vocab_size == TINY_VOCAB_SIZE and TINY_VOCAB_SIZE % 128 != 0
    for field, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        assert getattr(config, field) == tokenizer.convert_tokens_to_ids(token) == SPECIAL_TOKEN_IDS[token]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    rope = text.rope_parameters
    assert sum(rope["mrope_section"]) * 2 == text.head_dim == 16 and rope["mrope_interleaved"] is True
    assert list(vision.deepstack_visual_indexes) == [1, 2] and vision.num_position_embeddings == 64
    if moe:
        assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (4, 2, 24)
        assert text.mlp_only_layers == [] and text.decoder_sparse_step == 1


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tied_embeddings_drop_lm_head(tmp_path, moe):
    folder = build_tiny_qwen3_vl(tmp_path / "tied", moe=moe, tie_word_embeddings=True)
    shapes = saved_shapes(folder)
    assert "model.language_model.embed_tokens.weight" in shapes
    assert not any(key.startswith("lm_head") for key in shapes)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
