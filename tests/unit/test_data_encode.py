"""SampleEncoder on the tiny Qwen2.5-VL processor: assistant-only labels, safe truncation, skips."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.data.encode import IGNORE_INDEX, SampleEncoder, keep_first_media
from vlm_bridge.testing.media import make_image, make_video_frames, save_video_frames
from vlm_bridge.testing.tiny_qwen2_5_vl import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    make_tiny_processor,
)

MERGE = 4  # spatial_merge_size ** 2 patches per placeholder token


@pytest.fixture(scope="module")
def processor():
    return make_tiny_processor()


def loss_runs(encoded, tokenizer) -> list[str]:
    """Decoded text of each contiguous run of loss tokens."""
    mask = (encoded.labels != IGNORE_INDEX).tolist()
    runs, current = [], []
    for token, on in zip(encoded.input_ids.tolist(), mask):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def two_image_chat():
    """Image A, answer, image B, answer: a cut inside B keeps the first answer to learn from."""
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": make_image(56, 84, 1)},
                    {"type": "text", "text": "Size?"},
                ],
            },
            {"role": "assistant", "content": "It is tall."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": make_image(112, 56, 2)},
                    {"type": "text", "text": "This?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "It is wide."}]},
        ]
    }


def image_then_video_chat():
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": make_image(56, 56, 3)},
                    {"type": "text", "text": "What?"},
                ],
            },
            {"role": "assistant", "content": "A square."},
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": make_video_frames(4, 56, 56)},
                    {"type": "text", "text": "And?"},
                ],
            },
            {"role": "assistant", "content": "It moves."},
        ]
    }


def test_template_probe(processor):
    encoder = SampleEncoder(processor, max_seq_len=512)
    assert encoder.header == "<|im_start|>assistant\n"
    assert encoder.end_of_turn == "<|im_end|>"


def test_multi_turn_text_mask(processor):
    encoder = SampleEncoder(processor, max_seq_len=512)
    sample = {
        "messages": [
            {"role": "user", "content": "Write a short poem."},
            {"role": "assistant", "content": "Shapes and colours."},
            {"role": "user", "content": [{"type": "text", "text": "Another?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The quick brown fox."}]},
        ]
    }
    encoded = encoder.encode(sample)
    assert loss_runs(encoded, processor.tokenizer) == [
        "Shapes and colours.<|im_end|>",
        "The quick brown fox.<|im_end|>",
    ]
    loss = encoded.labels != IGNORE_INDEX
    assert torch.equal(encoded.labels[loss], encoded.input_ids[loss])  # not shifted
    assert encoded.num_loss_tokens == int(loss.sum())
    assert encoded.pixel_values is None and encoded.pixel_values_videos is None


def test_multi_image_mask(processor):
    encoded = SampleEncoder(processor, max_seq_len=512).encode(two_image_chat())
    assert loss_runs(encoded, processor.tokenizer) == ["It is tall.<|im_end|>", "It is wide.<|im_end|>"]
    grid = encoded.image_grid_thw
    assert grid.tolist() == [[1, 6, 4], [1, 4, 8]]
    assert encoded.pixel_values.shape[0] == int(grid.prod(-1).sum())
    assert int((encoded.input_ids == IMAGE_TOKEN_ID).sum()) == int(grid.prod(-1).sum()) // MERGE
    # No loss on the image placeholders or the prompt.
    assert not bool((encoded.labels == IMAGE_TOKEN_ID).any())


@pytest.mark.parametrize("as_folder", [False, True])
def test_video_mask(processor, tmp_path, as_folder):
    frames = make_video_frames(4, 56, 56)
    video = str(tmp_path / "clip") if as_folder else frames
    if as_folder:
        save_video_frames(frames, video)
    sample = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video", "video": video}, {"type": "text", "text": "What happens?"}],
            },
            {"role": "assistant", "content": "A square moves."},
        ]
    }
    encoded = SampleEncoder(processor, max_seq_len=512, video_fps=2.0).encode(sample)
    assert loss_runs(encoded, processor.tokenizer) == ["A square moves.<|im_end|>"]
    assert encoded.video_grid_thw.tolist() == [[2, 4, 4]]
    assert encoded.pixel_values_videos.shape[0] == 32
    # temporal_patch_size 2 at 2 frames per second: one second per temporal grid step.
    assert encoded.second_per_grid_ts.tolist() == [1.0]
    assert int((encoded.input_ids == VIDEO_TOKEN_ID).sum()) == 32 // MERGE


def test_keep_first_media():
    grid = torch.tensor([[1, 2, 2], [2, 2, 4], [1, 4, 2]])
    pixels = torch.arange(4 + 16 + 8)[:, None].float()
    kept, kept_grid = keep_first_media(pixels, grid, 2)
    assert kept.shape[0] == 20 and torch.equal(kept_grid, grid[:2]) and torch.equal(kept, pixels[:20])
    assert keep_first_media(pixels, grid, 0) == (None, None)
    assert keep_first_media(pixels, None, 1)[0].shape[0] == 1  # one entry per item without a grid


def _second_span(ids: torch.Tensor, token_id: int) -> tuple[int, int]:
    """(vision_start index, vision_end index) of the last media item of ``token_id``."""
    first = int((ids == token_id).nonzero()[-1])
    while int(ids[first - 1]) == token_id:
        first -= 1
    start = first - 1
    end = int((ids == VISION_END_ID).nonzero()[-1])
    assert int(ids[start]) == VISION_START_ID
    return start, end


@pytest.fixture(scope="module")
def hf_model(tiny_hf):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf, local_files_only=True).eval()


@pytest.fixture(scope="module")
def two_image_reference(processor, hf_model):
    """The untruncated two-image sample and its HF logits (computed once; a forward is ~1 s)."""
    full = SampleEncoder(processor, max_seq_len=4096).encode(two_image_chat())
    with torch.no_grad():
        return full, hf_model(**full.model_inputs()).logits


@pytest.mark.parametrize("offset", ["after_start", "middle", "before_end"])
def test_truncation_never_splits_an_image(processor, hf_model, two_image_reference, offset):
    full, reference = two_image_reference
    start, end = _second_span(full.input_ids, IMAGE_TOKEN_ID)
    cut = {"after_start": start + 1, "middle": (start + end) // 2, "before_end": end}[offset]
    encoder = SampleEncoder(processor, max_seq_len=cut)
    encoded = encoder.encode(two_image_chat())

    assert len(encoded) == start and encoded.truncated  # cut moved to before <|vision_start|>
    assert torch.equal(encoded.input_ids, full.input_ids[:start])
    assert encoded.image_grid_thw.tolist() == [[1, 6, 4]]
    rows = int(encoded.image_grid_thw.prod())
    assert encoded.pixel_values.shape[0] == rows
    assert torch.equal(encoded.pixel_values, full.pixel_values[:rows])
    assert int((encoded.input_ids == IMAGE_TOKEN_ID).sum()) == rows // MERGE
    assert loss_runs(encoded, processor.tokenizer) == ["It is tall.<|im_end|>"]
    assert encoder.stats["truncated"] == 1 and encoder.stats["encoded"] == 1

    with torch.no_grad():
        out = hf_model(**encoded.model_inputs(with_labels=True))
    assert torch.isfinite(out.loss)
    # The kept prefix sees exactly what it saw in the full sample (causal, same positions).
    torch.testing.assert_close(out.logits[0], reference[0, :start], atol=1e-4, rtol=1e-4)


def test_truncation_drops_a_video_and_keeps_the_image(processor, hf_model):
    full = SampleEncoder(processor, max_seq_len=4096).encode(image_then_video_chat())
    assert loss_runs(full, processor.tokenizer) == ["A square.<|im_end|>", "It moves.<|im_end|>"]
    start, end = _second_span(full.input_ids, VIDEO_TOKEN_ID)
    encoded = SampleEncoder(processor, max_seq_len=start + 5).encode(image_then_video_chat())
    assert len(encoded) == start
    assert encoded.pixel_values_videos is None and encoded.video_grid_thw is None
    assert encoded.second_per_grid_ts is None
    assert torch.equal(encoded.pixel_values, full.pixel_values)
    assert torch.equal(encoded.mm_token_type_ids, full.mm_token_type_ids[:start])
    assert loss_runs(encoded, processor.tokenizer) == ["A square.<|im_end|>"]
    with torch.no_grad():
        out = hf_model(**encoded.model_inputs(with_labels=True))
        reference = hf_model(**full.model_inputs(with_labels=True))
    assert torch.isfinite(reference.loss)  # the full image + video sample runs too
    torch.testing.assert_close(out.logits[0], reference.logits[0, :start], atol=1e-4, rtol=1e-4)


def test_skip_counts(processor, tmp_path):
    encoder = SampleEncoder(processor, max_seq_len=40, skip_bad_media=True)
    # The first image span straddles position 40 and nothing before it is an answer.
    assert encoder.encode(two_image_chat()) is None
    no_answer = {"messages": [{"role": "user", "content": "Hello?"}]}
    assert encoder.encode(no_answer) is None
    missing = tmp_path / "missing.png"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    for path in (missing, corrupt):
        sample = {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": str(path)}]},
                {"role": "assistant", "content": "x"},
            ]
        }
        assert encoder.encode(sample) is None
    assert encoder.stats == {"encoded": 0, "truncated": 0, "too_long": 1, "bad_media": 2, "no_loss_tokens": 1}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    encoder = SampleEncoder(processor, max_seq_len=512)
    assert [e.num_loss_tokens > 0 for e in encoder.iter_encoded([no_answer, short, no_answer])] == [True]
    assert encoder.stats["encoded"] == 1 and encoder.stats["no_loss_tokens"] == 2


@pytest.mark.parametrize(
    "kind, name", [("image", "nope.png"), ("image", "bad.jpg"), ("video", "clip.mp4"), ("video", "frames")]
)
def test_bad_media_raises_naming_the_file(processor, tmp_path, kind, name):
    path = tmp_path / name
    if name == "bad.jpg":
        path.write_bytes(b"\x00" * 10)
    if name == "frames":
        path.mkdir()  # a folder without frames
    sample = {
        "messages": [
            {"role": "user", "content": [{"type": kind, kind: str(path)}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    with pytest.raises(ValueError, match=str(path)) as info:
        SampleEncoder(processor, max_seq_len=512).encode(sample, where="sample 7")
    assert str(info.value).startswith("sample 7: ")


def test_media_in_assistant_turn_is_refused(processor):
    sample = {
        "messages": [
            {"role": "user", "content": "Draw."},
            {"role": "assistant", "content": [{"type": "image", "image": make_image(56, 56)}]},
        ]
    }
    with pytest.raises(ValueError, match="assistant turns"):
        SampleEncoder(processor, max_seq_len=512).encode(sample)


def test_token_alignment_helpers():
    from vlm_bridge.data.encode import _align_slow, _embed

    # Qwen-style: one placeholder (9) becomes a run; the other tokens keep their order.
    assert _embed([1, 8, 9, 7, 5], [1, 8, 9, 9, 9, 7, 5]) == [0, 1, 2, 5, 6]
    # A processor that replaces a token is not an insertion; the general alignment maps the rest.
    assert _embed([1, 9, 5, 6], [1, 3, 3, 5, 6]) is None
    assert _align_slow([1, 9, 5, 6], [1, 3, 3, 5, 6]) == [0, None, 3, 4]
