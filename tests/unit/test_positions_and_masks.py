"""3-D MRoPE positions equal HF's get_rope_index; attention masks have the intended structure."""

from __future__ import annotations

import torch

from vlm_bridge.attention.core import AttentionMask
from vlm_bridge.families._qwen.mrope import mrope_position_ids


def test_mrope_positions_match_hf(tiny_hf):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_bridge.testing.media import make_image, make_video_frames
    from vlm_bridge.verify import build_batch

    processor = AutoProcessor.from_pretrained(tiny_hf)
    model = AutoModelForImageTextToText.from_pretrained(tiny_hf)
    images = [make_image(224, 168, seed=1), make_image(112, 224, seed=2)]
    batch = build_batch(processor, images, make_video_frames(6, 112, 84, seed=3), "Hi", fps=1.0)
    cfg = model.config
    ours = mrope_position_ids(
        batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], batch["video_grid_thw"],
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        spatial_merge_size=cfg.vision_config.spatial_merge_size,
        tokens_per_second=cfg.vision_config.tokens_per_second,
        second_per_grid_ts=batch["second_per_grid_ts"],
    )
    theirs, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], batch["video_grid_thw"],
        batch["second_per_grid_ts"], batch["attention_mask"],
    )
    assert float(batch["second_per_grid_ts"][0]) != 1.0  # the video interval is exercised
    assert torch.equal(ours, theirs)


def test_segment_mask_is_block_diagonal_causal_and_pads_attend_to_themselves():
    mask = AttentionMask(segment_ids=torch.tensor([[-1, 0, 0, 1, 1]]), causal=True).dense(5, 5, "cpu")
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [0, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


def test_cu_seqlens_mask_is_bidirectional_within_blocks():
    mask = AttentionMask.from_cu_seqlens(torch.tensor([0, 2, 5]), causal=False).dense(5, 5, "cpu")
    assert torch.equal(mask[0, 0, :2, :2], torch.ones(2, 2, dtype=torch.bool))
    assert not mask[0, 0, :2, 2:].any() and mask[0, 0, 2:, 2:].all()


def test_cu_seqlens_of_packed_row_and_refusal_for_split_segments():
    packed = AttentionMask(segment_ids=torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1]]), causal=True)
    cu, max_len = packed.cu_seqlens(torch.device("cpu"))
    assert cu.tolist() == [0, 2, 5, 6, 8] and max_len == 3 and cu.dtype == torch.int32
    split = AttentionMask(segment_ids=torch.tensor([[0, 1, 0]]), causal=False)
    assert split.cu_seqlens(torch.device("cpu")) is None
    assert AttentionMask(segment_ids=torch.zeros(2, 4, dtype=torch.long)).cu_seqlens("cpu") is None


def test_vision_features_go_in_row_major_by_index_with_masked_scatter_gradients():
    """Features fill the placeholders in (batch, position) order; values and both gradients equal
    ``masked_scatter``'s (which the index form replaced: its backward waited for the GPU). A count
    that does not match is one line naming both numbers."""
    import pytest
    import torch

    from vlm_bridge.families._common.modules import scatter_vision_embeddings

    torch.manual_seed(0)
    ids = torch.tensor([[5, 9, 9, 5, 9], [9, 5, 5, 9, 5]])  # 9: the placeholder
    emb = torch.randn(5, 2, 3, requires_grad=True)  # [s, b, h]
    feats = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 2, 3)
    out = scatter_vision_embeddings(emb, ids, 9, feats, "images")
    out.backward(upstream)
    got = (out.detach(), emb.grad.clone(), feats.grad.clone())
    emb.grad = feats.grad = None
    want = emb.transpose(0, 1).masked_scatter((ids == 9)[..., None], feats).transpose(0, 1)
    want.backward(upstream)
    for a, b in zip(got, (want.detach(), emb.grad, feats.grad), strict=True):
        assert torch.equal(a, b)
    assert out.is_contiguous() and torch.equal(out[2, 0], feats[1].detach())  # row 0's second 9
    with pytest.raises(ValueError, match="images: 5 placeholder tokens in input_ids but 4 features"):
        scatter_vision_embeddings(emb, ids, 9, feats[:4], "images")
