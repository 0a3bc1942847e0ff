"""Deterministic synthetic images and videos for tests and demos.

Tests must not download media, and parity checks need the exact same pixels
on every run and every machine, so everything here is drawn with PIL from a
seeded :class:`random.Random`.

Video input format (transformers 5.24, ``Qwen2VLVideoProcessor``): a video is
accepted either as a ``list[PIL.Image.Image]`` of RGB frames or as a
``numpy.ndarray`` / ``torch.Tensor`` of shape ``[T, H, W, 3]`` (uint8); a batch
is a list of such videos. Both forms are handled in memory by
``transformers.video_utils.make_batched_videos`` and need no decoder backend
(torchcodec / decord / PyAV / OpenCV), which only come into play for file
paths or URLs. :func:`make_video_frames` therefore returns PIL frames, and
:func:`frames_to_array` gives the array form. :func:`save_video_frames` and
:func:`load_video_frames` round-trip a clip through a folder of PNG files so a
CLI demo can take a "video" from disk without any video codec.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]


def _random_colour(rng: random.Random) -> RGB:
    """Draw a saturated-enough colour so shapes differ clearly from the background."""
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _random_box(rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
    """Pick a box covering between a quarter and most of each side, fully inside the image."""
    box_w = rng.randint(max(1, width // 4), max(1, (3 * width) // 4))
    box_h = rng.randint(max(1, height // 4), max(1, (3 * height) // 4))
    left = rng.randint(0, width - box_w)
    top = rng.randint(0, height - box_h)
    return (left, top, left + box_w - 1, top + box_h - 1)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Return a deterministic RGB image with a coloured rectangle and ellipse.

    Shapes (rather than noise) give the vision tower spatially structured input,
    so window attention and patch merging see neighbouring patches that differ,
    while the seed keeps the pixels bit-identical across runs.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), _random_colour(rng))
    draw = ImageDraw.Draw(image)
    draw.rectangle(_random_box(rng, width, height), fill=_random_colour(rng))
    draw.ellipse(_random_box(rng, width, height), fill=_random_colour(rng))
    return image


def _square_position(index: int, num_frames: int, span: int) -> int:
    """Linear position along one axis so the shape sweeps across the whole clip."""
    if num_frames <= 1:
        return 0
    return round(index * span / (num_frames - 1))


def make_video_frames(num_frames: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    """Return ``num_frames`` RGB frames of a square moving diagonally over a fixed background.

    Motion makes consecutive frames differ, so the temporal patch (two frames
    folded into one patch) and the temporal M-RoPE index are exercised with
    non-trivial content.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    base = make_image(width, height, seed=seed)
    rng = random.Random(seed + 1)
    colour = _random_colour(rng)
    side = max(1, min(width, height) // 3)
    frames = []
    for index in range(num_frames):
        frame = base.copy()
        left = _square_position(index, num_frames, width - side)
        top = _square_position(index, num_frames, height - side)
        ImageDraw.Draw(frame).rectangle((left, top, left + side - 1, top + side - 1), fill=colour)
        frames.append(frame)
    return frames


def frames_to_array(frames: Sequence[Image.Image]) -> np.ndarray:
    """Stack PIL frames into the ``[T, H, W, 3]`` uint8 array the video processor also accepts."""
    return np.stack([np.asarray(frame.convert("RGB"), dtype=np.uint8) for frame in frames])


def save_video_frames(frames: Sequence[Image.Image], out_dir: str | Path) -> list[Path]:
    """Write frames as ``frame_000.png``... so a clip can live on disk without a video codec."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = out_dir / f"frame_{index:03d}.png"
        frame.save(path)
        paths.append(path)
    return paths


def load_video_frames(frame_dir: str | Path) -> list[Image.Image]:
    """Read back frames written by :func:`save_video_frames`, in frame order, as RGB."""
    paths = sorted(Path(frame_dir).glob("frame_*.png"))
    if not paths:
        raise FileNotFoundError(f"no frame_*.png files in {frame_dir}")
    frames = []
    for path in paths:
        with Image.open(path) as frame:
            frames.append(frame.convert("RGB"))
    return frames
