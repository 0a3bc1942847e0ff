"""Video files decoded with PyAV (vlm_bridge.data.video) give exactly what each tiny family's HF
processor gives when it decodes the path itself (its own fetch_videos, decoder forced to PyAV)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from vlm_bridge.data.encode import BadMediaError, SampleEncoder
from vlm_bridge.data.video import read_video
from vlm_bridge.testing.media import make_video_frames

FPS, NUM_FRAMES, SIDE = 8, 20, 64
# Frames each tiny processor uses of the 20-frame 8 fps clip with its defaults: Qwen2.5-VL's
# video processor does not sample (every frame); Qwen3-VL's samples at 2 fps (2.5 s -> 5 frames,
# evenly spread).
EXPECTED_INDICES = {"qwen2_5_vl": list(range(NUM_FRAMES)), "qwen3_vl": [0, 5, 10, 14, 19]}


def _frame(index: int) -> np.ndarray:
    """Grey background, a red square moving 2 px per frame: every frame differs clearly."""
    frame = np.full((SIDE, SIDE, 3), 96, np.uint8)
    frame[2 * index : 2 * index + 16, 2 * index : 2 * index + 16] = (230, 40, 40)
    return frame


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = SIDE
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for index in range(NUM_FRAMES):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(_frame(index), format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request) -> tuple[str, object]:
    folder = request.getfixturevalue({"qwen2_5_vl": "tiny_hf", "qwen3_vl": "tiny_qwen3"}[request.param])
    return request.param, AutoProcessor.from_pretrained(folder, local_files_only=True)


@pytest.fixture
def hf_path_flow(monkeypatch):
    """Process with HF decoding the path itself: its fetch_videos unchanged, but its load_video
    call sent to PyAV instead of torchcodec (not installed here)."""
    import transformers.video_processing_utils as vpu

    real, calls = vpu.load_video, []

    def pyav(video, backend, sample_indices_fn=None):
        calls.append(video)
        return real(video, backend="pyav", sample_indices_fn=sample_indices_fn)

    monkeypatch.setattr(vpu, "is_torchcodec_usable", lambda **_: True)
    monkeypatch.setattr(vpu, "load_video", pyav)

    def run(processor, text, path, **kwargs):
        out = processor(text=[text], videos=[str(path)], return_tensors="pt", **kwargs)
        assert calls == [str(path)]
        calls.clear()
        return out

    run.calls = calls
    return run


def _prompt(processor) -> str:
    user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}
    return processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)


def _assert_same(ours, theirs) -> None:
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == ours[key].dtype and torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


def test_decodes_the_frames_the_processor_uses(clip, family):
    name, processor = family
    frames, metadata, kwargs = read_video(clip, processor)
    indices = EXPECTED_INDICES[name]
    assert frames.shape == (len(indices), SIDE, SIDE, 3) and frames.dtype == np.uint8
    assert list(metadata["frames_indices"]) == indices
    assert (metadata["total_num_frames"], metadata["fps"]) == (NUM_FRAMES, FPS)
    # Only a sampling processor gets told not to sample again.
    assert kwargs == ({"do_sample_frames": False} if name == "qwen3_vl" else {})
    # Each decoded frame is (lossily) the source frame of its index, not a neighbour.
    source = np.stack([_frame(i) for i in range(NUM_FRAMES)]).astype(float)
    error = np.abs(frames.astype(float)[:, None] - source[None]).mean(axis=(2, 3, 4))
    assert error.argmin(1).tolist() == indices and error.min(1).max() < 3


@pytest.mark.parametrize("fps", [None, 4])
def test_matches_hf_decoding_the_path(clip, family, hf_path_flow, fps):
    name, processor = family
    text, rate = _prompt(processor), {} if fps is None else {"fps": fps}
    frames, metadata, kwargs = read_video(clip, processor, fps)
    ours = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt", **kwargs)
    theirs = hf_path_flow(processor, text, clip, **rate)
    _assert_same(ours, theirs)
    t = theirs["video_grid_thw"][0, 0].item()
    if name == "qwen3_vl":  # 5 frames (0, 5, ...) or at fps 4 10 (0, 2, ...); 2 frames per step
        first = "<0.3 seconds>" if fps is None else "<0.1 seconds>"  # mean time of the first 2 frames
        assert t == (3 if fps is None else 5) and first in processor.decode(ours["input_ids"][0])
    else:  # every frame, fps or not; 2 frames per temporal step at 8 fps
        assert t == NUM_FRAMES // 2 and ours["second_per_grid_ts"].tolist() == [0.25]


def _chat(*videos) -> dict:
    content = [*({"type": "video", "video": v} for v in videos), {"type": "text", "text": "What moves?"}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": "A red square."}]}


def test_encoder_reads_video_files(clip, family, hf_path_flow):
    _, processor = family
    encoded = SampleEncoder(processor, max_seq_len=1024).encode(_chat(str(clip)))
    theirs = hf_path_flow(processor, _prompt(processor), clip)
    assert encoded is not None and encoded.num_loss_tokens > 0
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if key in theirs:
            assert torch.equal(encoded.media[key], theirs[key]), key
    video_tokens = int((theirs["input_ids"] == processor.video_token_id).sum())
    assert int((encoded.input_ids == processor.video_token_id).sum()) == video_tokens > 0


def test_file_and_frames_in_one_sample(clip, family, hf_path_flow):
    """The file's do_sample_frames=False covers the whole call: frames given directly are sampled
    by the encoder as the processor would have (12 frames at 8 fps -> Qwen3-VL keeps 4)."""
    _, processor = family
    frames = make_video_frames(12, 56, 56)
    encoded = SampleEncoder(processor, max_seq_len=2048, video_fps=FPS).encode(_chat(str(clip), frames))
    text = _prompt(processor)
    from_file = hf_path_flow(processor, text, clip, fps=FPS)
    from_frames = processor(text=[text], videos=[frames], return_tensors="pt",
                            video_metadata=[{"total_num_frames": len(frames), "fps": FPS}])
    for key in ("pixel_values_videos", "video_grid_thw"):
        assert torch.equal(encoded.media[key], torch.cat([from_file[key], from_frames[key]])), key


def test_unreadable_files(tmp_path, family):
    _, processor = family
    bad = tmp_path / "x.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (bad, tmp_path / "missing.mp4"):
        with pytest.raises(ValueError, match="cannot read video") as info:
            read_video(path, processor)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BadMediaError, match=f"sample 3: cannot read video {bad}"):
        SampleEncoder(processor, max_seq_len=256).encode(_chat(str(bad)), where="sample 3")
    encoder = SampleEncoder(processor, max_seq_len=256, skip_bad_media=True)
    assert encoder.encode(_chat(str(bad))) is None and encoder.stats["bad_media"] == 1


def test_processor_without_video(clip):
    from vlm_bridge.testing.tiny_gemma3_vl import make_tiny_gemma3_processor

    with pytest.raises(ValueError, match=f"cannot read video {clip}: Gemma3Processor takes no video"):
        read_video(clip, make_tiny_gemma3_processor())


def test_verify_decodes_video_files(clip, family, hf_path_flow):
    """verify's batch (image row, video row, text row) from a file matches HF decoding the path."""
    from vlm_bridge.testing.media import make_image
    from vlm_bridge.verify import build_batch, load_media

    _, processor = family
    images, video = load_media([], str(clip), processor)
    ours = build_batch(processor, [make_image(56, 56)], video, "What moves?")
    assert hf_path_flow.calls == []
    rows = [[{"type": "image"}], [{"type": "video"}], []]
    texts = processor.apply_chat_template(
        [[{"role": "user", "content": [*r, {"type": "text", "text": "What moves?"}]}] for r in rows],
        add_generation_prompt=True, tokenize=False)
    theirs = processor(text=texts, images=[[make_image(56, 56)], [], []], videos=[str(clip)],  # HF decodes
                       padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    assert hf_path_flow.calls == [str(clip)]
    _assert_same(ours, theirs)


@pytest.mark.parametrize("fixture", ["tiny_hf", "tiny_qwen3"])
def test_generates_from_the_file(clip, fixture, request):
    """The mp4 goes through generate: greedy tokens equal HF generate on the same inputs."""
    from vlm_bridge.inference.requests import request_from_args
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.testing.generation import generation_parity

    folder = request.getfixturevalue(fixture)
    batches = [[request_from_args("What moves?", [], str(clip))]]
    report = run_parallel(generation_parity, 1, str(folder), ParallelConfig(), batches, 6, False)
    assert report["steps"] > 0 and report["ours"] == report["hf"], report
