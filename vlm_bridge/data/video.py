"""Decode video files with PyAV, sampling frames exactly as the model's own HF processor would.

Given a file path, a transformers 5.24 processor decodes it in ``BaseVideoProcessor.fetch_videos``,
which only knows torchcodec (and torchvision's removed decoder), so paths fail where torchcodec is
missing. We decode with PyAV (``av``, wheels bundle FFmpeg) and hand the processor frames plus
metadata instead, reproducing its path flow:

* a video processor with ``do_sample_frames`` picks frame indices from the file's metadata with its
  own ``sample_frames``. We call that same function while decoding, so only the chosen frames are
  kept (decoding every frame of a long clip at full resolution costs gigabytes), and return
  ``do_sample_frames=False`` for the processor call so it does not sample the frames a second
  time. The metadata keeps ``frames_indices``, from which the processors derive
  ``second_per_grid_ts`` or frame timestamps;
* otherwise the processor uses every frame, so every frame is decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class DecodedVideo(NamedTuple):
    """What :func:`read_video` returns: pass ``videos=[frames]``, ``video_metadata=[metadata]`` and
    ``**processor_kwargs`` to the processor call."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB, only the frames the processor uses
    metadata: dict[str, Any]  # VideoMetadata fields; a plain dict mixes with callers' own dicts
    processor_kwargs: dict[str, Any]


def video_processor_of(processor: Any, what: str) -> Any:
    """The processor's video processor; a one-line ValueError naming ``what`` for image-only
    families, whose processors have none."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None:
        raise ValueError(f"cannot read video {what}: {type(processor).__name__} takes no video")
    return video_processor


def read_video(path: str | Path, processor: Any, fps: float | None = None) -> DecodedVideo:
    """Decode the video file at ``path`` with PyAV into what ``processor`` uses of it.

    ``fps``, when given, replaces the processor's own sampling rate; it does not switch sampling
    on for a processor that uses every frame. Missing or undecodable files raise a one-line
    ``ValueError`` naming the file.
    """
    from transformers.video_utils import load_video

    video_processor = video_processor_of(processor, str(path))
    if not Path(path).is_file():
        raise ValueError(f"cannot read video {path} (no such file)")
    kwargs: dict[str, Any] = {}
    sample_indices_fn = None  # load_video then keeps every frame, as the processor's path flow does
    if getattr(video_processor, "do_sample_frames", False):
        # No processor in transformers 5.24 sets sampling defaults at processor level, so the video
        # processor's own attributes (which sample_frames falls back to) are what a call would use.
        def sample_indices_fn(metadata: Any, **_: Any) -> Any:
            return video_processor.sample_frames(metadata, **({} if fps is None else {"fps": fps}))

        kwargs["do_sample_frames"] = False
    try:
        frames, metadata = load_video(str(path), backend="pyav", sample_indices_fn=sample_indices_fn)
    except Exception as exc:  # FFmpeg/PyAV errors, and sampling errors on empty or truncated files
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"cannot read video {path}: not a video PyAV decodes, or an empty one "
                         f"({reason})") from None
    return DecodedVideo(frames, dict(metadata), kwargs)


def sample_like_processor(frames: Any, metadata: dict[str, Any], processor: Any) -> tuple[Any, dict]:
    """Sample in-memory frames as the processor itself would (``_decode_and_sample_videos``).

    For a call that also carries a :func:`read_video` result, whose ``do_sample_frames=False``
    applies to every video of the call: frames given directly are then sampled here instead.
    """
    video_processor = video_processor_of(processor, "frames")
    if not getattr(video_processor, "do_sample_frames", False):
        return frames, metadata
    from transformers.video_utils import VideoMetadata

    sampled = VideoMetadata(**metadata)
    sampled.frames_indices = video_processor.sample_frames(sampled)
    return [frames[int(i)] for i in sampled.frames_indices], dict(sampled)
